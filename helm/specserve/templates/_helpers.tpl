{{/* Chart name, truncated to the 63 characters Kubernetes allows in a label. */}}
{{- define "specserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name prefix. KubeRay appends suffixes (-raycluster-xxxxx, -serve-svc), so keep it short. */}}
{{- define "specserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "specserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "specserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "specserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "specserve.labels" -}}
{{ include "specserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Name of the Service KubeRay creates in front of the Serve HTTP proxies. */}}
{{- define "specserve.serveService" -}}
{{- printf "%s-serve-svc" (include "specserve.fullname" .) -}}
{{- end -}}

{{/*
One Ray pod template. Arguments: root (the chart context), component (head|draft|target),
group (that group's values), gpus (GPUs per pod, 0 for none), ports (list of name/port).
The pod works under OpenShift's restricted SCC: no fixed UID or fsGroup, non-root, no privilege
escalation, no capabilities, a seccomp profile, HOME on a writable path.
*/}}
{{- define "specserve.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "specserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    seccompProfile:
      {{- toYaml $v.securityContext.seccompProfile | nindent 6 }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .component }}
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
      env:
        - name: HOME
          value: /tmp
        - name: HF_HOME
          value: {{ printf "%s/hf" $v.modelCache.mountPath | quote }}
        - name: SPECSERVE_CACHE
          value: {{ printf "%s/specserve" $v.modelCache.mountPath | quote }}
        {{- if $v.hfToken.secretName }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.hfToken.secretName }}
              key: {{ $v.hfToken.secretKey }}
              optional: true
        {{- end }}
        {{- if $v.auth.existingSecret }}
        # The OpenAI ingress may run in any pod: every pod gets the key file (see auth.existingSecret).
        - name: SPECSERVE_API_KEYS_FILE
          value: {{ include "specserve.apiKeysFile" $root | quote }}
        {{- end }}
        {{- if eq .component "head" }}
        - name: RAY_GRAFANA_HOST
          value: {{ $v.monitoring.grafanaHost | quote }}
        - name: RAY_GRAFANA_IFRAME_HOST
          value: {{ default $v.monitoring.grafanaHost $v.monitoring.grafanaIframeHost | quote }}
        - name: RAY_PROMETHEUS_HOST
          value: {{ $v.monitoring.prometheusHost | quote }}
        {{- end }}
        {{- if $v.serveThroughputOptimized }}
        - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
          value: "1"
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if and (ne .component "head") $v.serveReadiness.enabled }}
      {{- include "specserve.serveReadinessProbe" $root | nindent 6 }}
      {{- end }}
      resources:
        {{- $res := dict "cpu" (toString .group.cpu) "memory" (toString .group.memory) }}
        {{- if gt (int .gpus) 0 }}
        {{- $_ := set $res $v.accelerator.resourceName (toString .gpus) }}
        {{- end }}
        requests:
          {{- toYaml $res | nindent 10 }}
        limits:
          {{- toYaml $res | nindent 10 }}
      securityContext:
        runAsNonRoot: true
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: model-cache
          mountPath: {{ $v.modelCache.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- if $v.auth.existingSecret }}
        - name: api-keys
          mountPath: {{ include "specserve.apiKeysDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize }}
    - name: model-cache
      {{- if $v.modelCache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $v.modelCache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $v.modelCache.emptyDirSizeLimit }}
      {{- end }}
    # Ray writes its session dir and logs under /tmp; an emptyDir is writable by any UID.
    - name: tmp
      emptyDir: {}
    {{- if $v.auth.existingSecret }}
    # Not optional: a missing Secret keeps the pod from starting rather than serving without keys.
    - name: api-keys
      secret:
        secretName: {{ $v.auth.existingSecret }}
        items:
          - key: {{ $v.auth.secretKey }}
            path: api-keys
    {{- end }}
{{- end -}}

{{/*
Readiness of a worker pod for Serve traffic (serveReadiness). KubeRay's own probe for RayService workers asks
the node's Serve proxy (`/-/healthz`: "success" while it runs and is not draining); this one asks that too and
then the app's `/health`, which answers 503 until the model replicas can serve. wget is in the Ray image
(KubeRay's probes use it too); each call gets 3 s, the probe 8 s.
*/}}
{{- define "specserve.serveReadinessProbe" -}}
{{- $v := .Values -}}
{{- $base := printf "http://localhost:%v" $v.serveService.port -}}
readinessProbe:
  exec:
    command:
      - bash
      - -c
      - {{ printf "wget --tries 1 -T 3 -q -O- %s/-/healthz | grep -q success && wget --tries 1 -T 3 -q -O /dev/null %s%s" $base $base (include "specserve.healthPath" .) | quote }}
  initialDelaySeconds: 10
  periodSeconds: {{ $v.serveReadiness.periodSeconds }}
  timeoutSeconds: 8
  successThreshold: 1
  failureThreshold: {{ $v.serveReadiness.failureThreshold }}
{{- end -}}

{{/* The app's readiness route (`/health` in deployments/app.py); open without an API key. */}}
{{- define "specserve.healthPath" -}}
/health
{{- end -}}

{{/* Where the API key Secret is mounted, and the key file the server reads (SPECSERVE_API_KEYS_FILE). */}}
{{- define "specserve.apiKeysDir" -}}
/etc/specserve/auth
{{- end -}}

{{- define "specserve.apiKeysFile" -}}
{{- printf "%s/api-keys" (include "specserve.apiKeysDir" .) -}}
{{- end -}}

{{/*
rayStartParams "resources" value. KubeRay pastes it into a shell command line, so the JSON object
must stay inside double quotes there: the YAML string itself holds "{\"name\": amount}".
*/}}
{{- define "specserve.rayResources" -}}
{{- printf `'"{\"%s\": %v}"'` .name .amount -}}
{{- end -}}

{{/*
Cross-field checks of the values that values.schema.json cannot express. Each fails `helm template` and
`helm install` (helm lint only reports them) with what to set instead, before anything reaches the cluster.
*/}}
{{- define "specserve.validateValues" -}}
{{- $v := .Values -}}
{{- $spec := $v.specserve -}}
{{- $topo := $spec.topology -}}
{{- $device := toString (dig "model" "device" "cpu" $spec) -}}
{{- $drafter := default (dict) $spec.drafter -}}
{{- $placement := toString (default "draft_workers" $drafter.vllm_placement) -}}
{{- if lt (int $v.targetGroup.maxReplicas) (int (default 1 $topo.num_target_groups)) -}}
{{- fail (printf "targetGroup.maxReplicas (%v) must be >= specserve.topology.num_target_groups (%v): each target group needs its own pod" $v.targetGroup.maxReplicas $topo.num_target_groups) -}}
{{- end -}}
{{- if and (not $v.accelerator.enabled) (gt (float64 (default 0 ($topo.target_rank).num_gpus)) 0.0) -}}
{{- fail "accelerator.enabled is false but specserve.topology.target_rank.num_gpus > 0: set it to 0 for CPU" -}}
{{- end -}}
{{- if and (not $v.accelerator.enabled) (hasPrefix "cuda" $device) -}}
{{- fail "accelerator.enabled is false but specserve.model.device is cuda: set it to cpu (values-cpu.yaml)" -}}
{{- end -}}
{{- /* The app refuses this at start-up (specserve.config.check_engine_fits); say so before pods start. */ -}}
{{- if and (eq (toString (dig "model" "engine" "hf" $spec)) "hf") (ne $placement "draft_workers") -}}
{{- fail (printf "specserve.model.engine hf drafts with drafter.kind, not with vllm_placement %q: also set specserve.drafter.vllm_placement=draft_workers" $placement) -}}
{{- end -}}
{{- /* vLLM's own method is named by vllm_builtin_method and placed with vllm_placement vllm_builtin, both or neither
(specserve.config.DrafterConfig refuses the rest at start-up). */ -}}
{{- $builtin := toString (default "" $drafter.vllm_builtin_method) -}}
{{- if and (eq $placement "vllm_builtin") (eq $builtin "") -}}
{{- fail "specserve.drafter.vllm_placement vllm_builtin runs vLLM's own method: set specserve.drafter.vllm_builtin_method (ngram, suffix, draft_model, eagle3 or dflash)" -}}
{{- end -}}
{{- if and (ne $builtin "") (ne $placement "vllm_builtin") -}}
{{- fail (printf "specserve.drafter.vllm_builtin_method %s is vLLM's own method: also set specserve.drafter.vllm_placement=vllm_builtin" $builtin) -}}
{{- end -}}
{{- /* A draft worker asking for CPU would wait forever: draft pods offer Ray none (see draftGroup). */ -}}
{{- if gt (float64 (dig "draft_worker" "num_cpus" 1 $topo)) 0.0 -}}
{{- fail "specserve.topology.draft_worker.num_cpus must be 0: draft pods offer Ray no CPU, so that only draft workers land there (size their threads with num_threads)" -}}
{{- end -}}
{{- /* A drafter with a model loads it on model.device on the draft workers: on cuda they need GPUs. */ -}}
{{- $modelDrafter := has (toString $drafter.kind) (list "draft_model" "block" "hybrid") -}}
{{- if and $modelDrafter (eq $placement "draft_workers") (hasPrefix "cuda" $device) (eq (float64 (dig "draft_worker" "num_gpus" 0 $topo)) 0.0) -}}
{{- fail (printf "specserve.drafter.kind %s loads a model on the draft workers' GPUs: set specserve.topology.draft_worker.num_gpus > 0 (draft pods then ask for draftGroup.gpus GPUs)" $drafter.kind) -}}
{{- end -}}
{{- end -}}

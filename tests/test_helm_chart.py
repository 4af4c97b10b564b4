"""The Helm chart: lints, renders valid objects, refuses bad values, and wires values through."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_tools import (
    CHART,
    ROOT,
    by_kind,
    crd_schemas,
    fits,
    helm,
    pod_templates,
    ray_offers,
    render,
    validate,
)

from deployments.config import AppConfig

PROFILES = {
    "default": (),
    "openshift": (CHART / "values-openshift.yaml",),
    "cpu": (CHART / "values-cpu.yaml",),
    "draft-model": (CHART / "values-draft-model.yaml",),
    **{f"ci-{p.stem}": (p,) for p in sorted((CHART / "ci").glob("*.yaml"))},
}
#: Profiles that serve what `make serve` serves (engine vllm, the n-gram drafter inside vLLM's worker).
MAKE_SERVE_PROFILES = ["default", "openshift", "cpu", "ci-cpu-values", "ci-default-values"]


def _rayservice(objs):
    (rs,) = by_kind(objs, "RayService")
    return rs


def _serve_app(rs):
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app


def _values(*files):
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    for f in files:
        merged = merge(merged, yaml.safe_load(f.read_text()))
    return merged


@pytest.mark.parametrize("profile", PROFILES)
def test_chart_lints_strictly_with_each_values_profile(profile):
    args = ["lint", str(CHART), "--strict"] + [a for f in PROFILES[profile] for a in ("--values", str(f))]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_every_rendered_object_validates_against_its_schema(profile):
    objs = render(*PROFILES[profile])
    assert objs
    for obj in objs:
        validate(obj)


@pytest.mark.parametrize(
    ("sets", "message", "refused_by"),
    [
        (("specserve.topology.tensor_parallel_size=0",), "tensor_parallel_size", "schema"),
        (("specserve.topology.tensor_parallel_size=two",), "tensor_parallel_size", "schema"),
        (("specserve.drafter.kind=magic",), "kind", "schema"),
        (("specserve.tensor_parallel_size=2",), "additional properties", "schema"),
        (("image.tag=latest",), "/image/tag", "schema"),
        (("route.timeout=forever",), "/route/timeout", "schema"),
        (("draftGroup.gpus=0",), "/draftGroup/gpus", "schema"),
        (("serveReadiness.failureThreshold=0",), "/serveReadiness/failureThreshold", "schema"),
        (("targetGroup.maxReplicas=1", "specserve.topology.num_target_groups=2"), "num_target_groups", "template"),
        (("accelerator.enabled=false",), "num_gpus", "template"),
        (("accelerator.enabled=false", "specserve.topology.target_rank.num_gpus=0"), "specserve.model.device",
         "template"),
        (("specserve.model.engine=hf",), "specserve.drafter.vllm_placement=draft_workers", "template"),
        (("specserve.drafter.vllm_method=local",), "vllm_method", "schema"),
        (("specserve.drafter.vllm_placement=vllm_builtin",), "vllm_builtin_method", "template"),
        (("specserve.drafter.vllm_builtin_method=ngram",), "vllm_placement=vllm_builtin", "template"),
        (("specserve.topology.draft_worker.num_cpus=1",), "draft_worker.num_cpus must be 0", "template"),
        (("specserve.drafter.kind=draft_model", "specserve.drafter.path=/models/tiny",
          "specserve.drafter.vllm_placement=draft_workers"), "draft_worker.num_gpus > 0", "template"),
    ],
    ids=["tp-zero", "tp-not-integer", "unknown-drafter", "misplaced-field", "latest-tag", "bad-route-timeout",
         "draft-pods-with-zero-gpus", "readiness-never-fails", "too-few-target-pods", "gpus-without-accelerator",
         "cuda-without-accelerator", "engine-hf-with-a-vllm-placement", "removed-vllm-method",
         "vllm-builtin-without-a-method", "vllm-builtin-method-without-the-placement", "draft-worker-asks-for-cpu",
         "draft-model-without-draft-gpus"],
)
def test_bad_values_are_refused_by_lint_and_template(sets, message, refused_by):
    set_args = [a for s in sets for a in ("--set", s)]
    # values.schema.json refusals stop both verbs. Cross-field checks are template `fail`s, which helm lint only
    # reports; template (and install) stop on them.
    verbs = (("lint", "--strict"), ("template",)) if refused_by == "schema" else (("template",),)
    for verb in verbs:
        result = helm(*verb, str(CHART), *set_args, check=False)
        assert result.returncode != 0, f"helm {verb[0]} accepted {sets}"
        assert message in result.stdout + result.stderr


def test_chart_refuses_engine_hf_with_a_vllm_placement_because_the_app_does():
    # If the app starts accepting it (engine hf ignoring vllm_placement), drop the chart's check too.
    from pydantic import ValidationError

    from specserve.errors import SpecServeError

    with pytest.raises(SpecServeError, match="vllm_placement"):
        AppConfig.model_validate({"model": {"engine": "hf"}, "drafter": {"vllm_placement": "vllm_worker"}})
    # And the builtin method's pairing with its placement, which the chart checks too.
    for drafter in ({"vllm_placement": "vllm_builtin"}, {"vllm_builtin_method": "ngram"}):
        with pytest.raises(ValidationError, match="vllm_builtin"):
            AppConfig.model_validate({"model": {"engine": "vllm"}, "drafter": drafter})


def test_values_schema_is_fresh():
    result = subprocess.run([sys.executable, "scripts/gen_values_schema.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_crd_schemas_are_fresh_and_reject_unknown_fields():
    result = subprocess.run([sys.executable, "scripts/crd_to_jsonschema.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rs = _rayservice(render())
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rs, crd_schemas()["RayService"])


def test_pod_template_checks_catch_a_misspelt_container_field():
    rs = _rayservice(render())
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(rs)


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_config_args_are_the_specserve_values_and_a_valid_app_config(profile):
    files = PROFILES[profile]
    app = _serve_app(_rayservice(render(*files)))
    assert app["import_path"] == "deployments.app:build_app"
    assert app["name"] == "specserve" and app["route_prefix"] == "/"
    assert app["args"] == _values(*files)["specserve"]
    AppConfig.model_validate(app["args"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_target_pods_ask_kubernetes_and_ray_for_tensor_parallel_size_gpus(tp):
    rs = _rayservice(render(sets=(f"specserve.topology.tensor_parallel_size={tp}",)))
    target = pod_templates(rs)["target"]["spec"]["containers"][0]["resources"]
    assert target["limits"]["nvidia.com/gpu"] == str(tp)
    assert target["requests"] == target["limits"]
    (group,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "target"]
    assert group["rayStartParams"]["num-gpus"] == str(tp)
    args = AppConfig.model_validate(_serve_app(rs)["args"])
    # Engine vllm runs the TP ranks as vLLM's own workers, all on the model replica's (target) pod.
    assert args.topology.tensor_parallel_size == tp and args.model.engine == "vllm"
    # Without a draft model nothing needs the small GPUs: draft pods ask for none.
    assert ray_offers(rs)["draft"]["GPU"] == 0
    assert "nvidia.com/gpu" not in pod_templates(rs)["draft"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("profile", MAKE_SERVE_PROFILES)
def test_default_and_cpu_values_serve_engine_vllm_with_ngram_inside_vllm(profile):
    args = AppConfig.model_validate(_serve_app(_rayservice(render(*PROFILES[profile])))["args"])
    assert args.model.engine == "vllm"
    assert (args.drafter.kind, args.drafter.vllm_placement) == ("ngram", "vllm_worker")


@pytest.mark.parametrize("profile", ["default", "cpu"])
def test_default_and_cpu_values_serve_what_make_serve_serves(profile):
    from specserve.config import apply_serve_defaults

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("without vLLM, make serve falls back to engine hf")
    args = AppConfig.model_validate(_serve_app(_rayservice(render(*PROFILES[profile])))["args"])
    # `make serve` with no config, on this profile's device: its engine, dtype (auto) and drafter.
    served = AppConfig.from_args(apply_serve_defaults({"model": {"device": args.model.device}}))
    assert args.model == served.model
    assert args.drafter == served.drafter


def test_draft_model_values_put_tp_on_the_large_gpu_group_and_draft_workers_on_the_small_one():
    from cluster.placement import bundle

    files = PROFILES["draft-model"]
    values = _values(*files)
    rs = _rayservice(render(*files))
    args = AppConfig.model_validate(_serve_app(rs)["args"])
    assert (args.model.engine, args.drafter.kind, args.drafter.vllm_placement) == ("vllm", "draft_model",
                                                                                  "draft_workers")
    assert args.drafter.path and args.topology.num_draft_workers > 0
    tp = args.topology.tensor_parallel_size
    assert tp > 1
    templates = pod_templates(rs)
    gpus = {g: t["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g, t in templates.items()}
    assert gpus == {"head": None, "draft": str(values["draftGroup"]["gpus"]), "target": str(tp)}
    offers = ray_offers(rs)
    # vLLM's Ray executor packs one {GPU: 1} bundle per rank onto as few nodes as possible: the target pod.
    assert offers["target"]["GPU"] == tp
    draft_worker = bundle(args.topology.draft_worker)
    assert draft_worker.get("GPU", 0) > 0
    assert [g for g, offer in offers.items() if fits(draft_worker, offer)] == ["draft"]
    # Small and large GPUs are different node pools.
    assert templates["draft"]["spec"]["nodeSelector"] != templates["target"]["spec"]["nodeSelector"]


@pytest.mark.parametrize("profile", ["default", "draft-model", "cpu"])
def test_serve_replicas_and_so_the_vllm_engine_can_only_land_on_target_pods(profile):
    from deployments.app import deployment_options

    rs = _rayservice(render(*PROFILES[profile]))
    offers = ray_offers(rs)
    for name, opts in deployment_options(AppConfig.model_validate(_serve_app(rs)["args"])).items():
        actor = opts["ray_actor_options"]
        # A replica reserves one CPU unless its options say otherwise (Ray Serve's default).
        request = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
        assert [g for g, offer in offers.items() if fits(request, offer)] == ["target"], name


def test_engine_hf_stays_selectable_through_values():
    rs = _rayservice(render(sets=("specserve.model.engine=hf", "specserve.drafter.vllm_placement=draft_workers")))
    args = AppConfig.model_validate(_serve_app(rs)["args"])
    assert (args.model.engine, args.drafter.kind) == ("hf", "ngram")


def test_cpu_profile_asks_for_no_gpu_anywhere():
    rs = _rayservice(render(CHART / "values-cpu.yaml"))
    assert "gpu" not in yaml.safe_dump(pod_templates(rs)).lower()
    assert {c["image"].rpartition(":")[2] for t in pod_templates(rs).values() for c in t["spec"]["containers"]} == {
        "0.1.0-cpu"}
    args = AppConfig.model_validate(_serve_app(rs)["args"])
    assert args.model.model == "default" and args.model.device == "cpu"
    assert args.topology.target_rank.num_gpus == 0


def test_head_runs_no_model_work_and_groups_offer_their_custom_resource():
    rc = _rayservice(render())["spec"]["rayClusterConfig"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rc["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    # The YAML string holds a double-quoted JSON object, as KubeRay passes it through a shell.
    assert groups["draft"]["rayStartParams"]["resources"] == '"{\\"draft_node\\": 1}"'
    assert groups["target"]["rayStartParams"]["resources"] == '"{\\"target_node\\": 1}"'
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_every_container_has_requests_equal_to_limits_and_shm_in_memory():
    for name, template in pod_templates(_rayservice(render())).items():
        spec = template["spec"]
        res = spec["containers"][0]["resources"]
        assert res["requests"] == res["limits"], name
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("profile", ["default", "openshift"])
def test_pods_fit_the_restricted_scc(profile):
    rs = _rayservice(render(*PROFILES[profile]))
    for name, template in pod_templates(rs).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        # OpenShift assigns UID and fsGroup from the namespace range: fixing them breaks admission.
        assert "runAsUser" not in spec["securityContext"] and "fsGroup" not in spec["securityContext"]
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert "runAsUser" not in sc and not sc.get("privileged")
            assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_head_points_the_ray_dashboard_at_grafana_and_prometheus():
    head = pod_templates(_rayservice(render()))["head"]["spec"]["containers"][0]
    names = {e["name"] for e in head["env"]}
    assert {"RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST", "RAY_PROMETHEUS_HOST"} <= names


def test_every_ray_container_runs_serve_throughput_optimized_as_make_serve_does_unless_turned_off():
    def flags(objs):
        pods = pod_templates(_rayservice(objs))
        return {name: [e.get("value") for e in pod["spec"]["containers"][0]["env"]
                       if e["name"] == "RAY_SERVE_THROUGHPUT_OPTIMIZED"] for name, pod in pods.items()}

    on = flags(render())
    assert set(on) >= {"head", "target"} and all(v == ["1"] for v in on.values()), on
    assert all(v == [] for v in flags(render(sets=("serveThroughputOptimized=false",))).values())


def test_hf_token_comes_from_an_optional_secret_only_when_named():
    def token_env(objs):
        c = pod_templates(_rayservice(objs))["target"]["spec"]["containers"][0]
        return [e for e in c["env"] if e["name"] == "HF_TOKEN"]

    assert token_env(render()) == []
    (env,) = token_env(render(sets=("hfToken.secretName=hf",)))
    assert env["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token", "optional": True}


def test_model_cache_uses_the_claim_when_given():
    def cache_volume(objs):
        (v,) = [v for v in pod_templates(_rayservice(objs))["target"]["spec"]["volumes"] if v["name"] == "model-cache"]
        return v

    assert "emptyDir" in cache_volume(render())
    assert cache_volume(render(sets=("modelCache.existingClaim=models",)))["persistentVolumeClaim"] == {"claimName": "models"}


def test_switches_turn_optional_objects_on_and_off():
    kinds = {o["kind"] for o in render()}
    assert {"RayService", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    assert not {"Route", "Ingress"} & kinds
    off = render(sets=("monitoring.podMonitor.enabled=false", "monitoring.prometheusRule.enabled=false",
                       "monitoring.grafanaDashboards.enabled=false"))
    assert {o["kind"] for o in off} == {"RayService"}
    assert len(by_kind(render(sets=("ingress.enabled=true",)), "Ingress")) == 1
    assert len(by_kind(render(CHART / "values-openshift.yaml"), "Route")) == 1


def test_openshift_route_is_edge_tls_with_a_streaming_timeout_to_the_serve_service():
    (route,) = by_kind(render(CHART / "values-openshift.yaml"), "Route")
    assert route["spec"]["tls"]["termination"] == "edge"
    timeout = route["metadata"]["annotations"]["haproxy.router.openshift.io/timeout"]
    assert timeout.endswith("m") and int(timeout[:-1]) >= 5
    assert route["spec"]["to"] == {"kind": "Service", "name": "specserve-serve-svc", "weight": 100}


def test_pod_monitors_cover_head_and_workers_and_select_rendered_pods():
    objs = render()
    monitors = {m["metadata"]["name"]: m for m in by_kind(objs, "PodMonitor")}
    assert set(monitors) == {"specserve-head", "specserve-workers"}
    assert not by_kind(objs, "ServiceMonitor")
    pod_labels = pod_templates(_rayservice(objs))["head"]["metadata"]["labels"]
    selector = monitors["specserve-head"]["spec"]["selector"]["matchLabels"]
    # ray.io/node-type is added by KubeRay; the rest must be on our templates.
    assert {k: v for k, v in selector.items() if not k.startswith("ray.io/")}.items() <= pod_labels.items()


def test_prometheus_rule_embeds_the_generated_rules_file():
    (rule,) = by_kind(render(), "PrometheusRule")
    generated = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == generated
    records = {r.get("record") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"specserve:acceptance_rate:rate5m", "specserve:mean_accepted_length:rate5m"} <= records


def test_one_labelled_configmap_per_generated_dashboard():
    maps = by_kind(render(), "ConfigMap")
    files = sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json"))
    assert sorted(k for m in maps for k in m["data"]) == files
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)


def _containers(rs):
    return {group: t["spec"]["containers"][0] for group, t in pod_templates(rs).items()}


def _probe_urls(probe) -> set[tuple[int, str]]:
    return {(int(port), path) for port, path in re.findall(r"http://localhost:(\d+)(/\S*)", probe["exec"]["command"][-1])}


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_pods_are_ready_only_while_their_proxy_serves_and_the_app_health_route_answers(profile):
    from ray.serve._private.constants import PROXY_MIN_DRAINING_PERIOD_S

    from deployments.app import api

    assert "/health" in {route.path for route in api.routes}
    containers = _containers(_rayservice(render(*PROFILES[profile])))
    for group in ("draft", "target"):
        c = containers[group]
        (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "serve"]
        probe = c["readinessProbe"]
        assert _probe_urls(probe) == {(port, "/-/healthz"), (port, "/health")}
        # A draining proxy still answers for PROXY_MIN_DRAINING_PERIOD_S: the pod must leave the Service sooner.
        assert probe["periodSeconds"] * probe["failureThreshold"] < PROXY_MIN_DRAINING_PERIOD_S
    # KubeRay deploys the app only once the head pod is ready: the head keeps KubeRay's own probe.
    assert "readinessProbe" not in containers["head"]
    # Liveness stays KubeRay's (Ray's node health): a pod still loading the model is never restarted for it.
    assert not [g for g, c in containers.items() if {"livenessProbe", "startupProbe"} & c.keys()]


def test_readiness_can_be_left_to_kuberay():
    containers = _containers(_rayservice(render(sets=("serveReadiness.enabled=false",))))
    assert not [g for g, c in containers.items() if "readinessProbe" in c]


class _FakeProxy(BaseHTTPRequestHandler):
    """A node's Serve proxy: /-/healthz and the app's /health with the statuses the test sets."""

    def do_GET(self):
        status, body = self.server.answers.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("proxy", "health", "ready"),
    [
        ((200, b"success"), (200, b'{"status": "ok"}'), True),
        ((200, b"success"), (503, b'{"error": {"message": "model replicas are starting"}}'), False),
        ((503, b"This node is being drained."), (200, b'{"status": "ok"}'), False),
    ],
    ids=["serving", "model-loading", "proxy-draining"],
)
def test_readiness_probe_command_passes_only_when_proxy_and_app_are_ready(proxy, health, ready):
    if shutil.which("wget") is None or shutil.which("bash") is None:
        pytest.skip("the probe runs wget under bash (both in the Ray image)")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeProxy)
    server.answers = {"/-/healthz": proxy, "/health": health}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rs = _rayservice(render(sets=(f"serveService.port={server.server_address[1]}",)))
        command = _containers(rs)["target"]["readinessProbe"]["exec"]["command"]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # reach 127.0.0.1 directly
        result = subprocess.run(command, env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is ready

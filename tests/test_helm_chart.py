"""The Helm chart: lints, renders valid objects, refuses bad values, and wires values through."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_tools import CHART, ROOT, by_kind, crd_schemas, helm, pod_templates, render, validate

from deployments.config import AppConfig

PROFILES = {
    "default": (),
    "openshift": (CHART / "values-openshift.yaml",),
    "cpu": (CHART / "values-cpu.yaml",),
    **{f"ci-{p.stem}": (p,) for p in sorted((CHART / "ci").glob("*.yaml"))},
}


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
    ("sets", "message"),
    [
        (("specserve.topology.tensor_parallel_size=0",), "tensor_parallel_size"),
        (("specserve.topology.tensor_parallel_size=two",), "tensor_parallel_size"),
        (("specserve.drafter.kind=magic",), "kind"),
        (("specserve.tensor_parallel_size=2",), "additional properties"),
        (("image.tag=latest",), "/image/tag"),
        (("targetGroup.maxReplicas=1", "specserve.topology.num_target_groups=2"), "num_target_groups"),
        (("accelerator.enabled=false",), "num_gpus"),
        (("route.timeout=forever",), "/route/timeout"),
    ],
    ids=["tp-zero", "tp-not-integer", "unknown-drafter", "misplaced-field", "latest-tag", "too-few-target-pods",
         "gpus-without-accelerator", "bad-route-timeout"],
)
def test_bad_values_are_refused_by_lint_and_template(sets, message):
    set_args = [a for s in sets for a in ("--set", s)]
    # values.schema.json refusals stop both verbs. Cross-field checks are template `fail`s, which
    # helm lint only reports; template (and install) stop on them.
    schema_error = not any(s.startswith(("targetGroup.", "accelerator.")) for s in sets)
    for verb in (("lint", "--strict"), ("template",)) if schema_error else (("template",),):
        result = helm(*verb, str(CHART), *set_args, check=False)
        assert result.returncode != 0, f"helm {verb[0]} accepted {sets}"
        assert message in result.stdout + result.stderr


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


@pytest.mark.parametrize("profile", ["default", "openshift", "cpu"])
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
    assert AppConfig.model_validate(_serve_app(rs)["args"]).topology.tensor_parallel_size == tp


def test_cpu_profile_asks_for_no_gpu_anywhere():
    rs = _rayservice(render(CHART / "values-cpu.yaml"))
    assert "gpu" not in yaml.safe_dump(pod_templates(rs)).lower()
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

"""k8s/ holds the chart's output as plain kustomize manifests, and stays in sync with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from chart_tools import CHART, ROOT, pod_templates, render, tool, validate

from deployments.config import AppConfig


def _kustomize(path: str) -> list[dict]:
    out = subprocess.run([str(tool("kubectl")), "kustomize", str(ROOT / path)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _by_key(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize(
    ("path", "values"),
    [("k8s/base", ()), ("k8s/overlays/openshift", (CHART / "values-openshift.yaml",))],
    ids=["base-is-default-values", "openshift-overlay-is-openshift-values"],
)
def test_kustomize_build_equals_helm_template(path, values):
    built = _by_key(_kustomize(path))
    expected = _by_key(render(*values))
    assert built.keys() == expected.keys()
    for k, obj in expected.items():
        assert built[k] == obj, f"{path}: {k} differs from the chart"


def test_generated_tree_is_fresh():
    result = subprocess.run([sys.executable, "scripts/gen_k8s.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_check_mode_notices_a_hand_edit(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_k8s
    finally:
        sys.path.pop(0)
    tool("helm")
    files = gen_k8s.render_tree()
    gen_k8s.write(files, tmp_path)
    assert gen_k8s.stale_files(files, tmp_path) == []
    target = tmp_path / "base" / "rayservice-specserve.yaml"
    target.write_text(target.read_text().replace("num-cpus: '0'", "num-cpus: '4'"))
    (tmp_path / "base" / "extra.yaml").write_text("kind: ConfigMap\n")
    assert gen_k8s.stale_files(files, tmp_path) == ["base/rayservice-specserve.yaml", "base/extra.yaml"]


def test_overlay_objects_validate():
    objs = list(_kustomize("k8s/overlays/openshift"))
    # The overlay must render the whole deployment plus the Route; validate() raises on a schema error.
    assert {"RayService", "Route"} <= {o["kind"] for o in objs}
    for obj in objs:
        validate(obj)


def test_plain_manifests_serve_engine_vllm_and_gate_worker_readiness_on_health():
    (rs,) = [o for o in yaml.safe_load_all((ROOT / "k8s/base/rayservice-specserve.yaml").read_text()) if o]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    args = AppConfig.model_validate(app["args"])
    assert (args.model.engine, args.drafter.vllm_placement) == ("vllm", "vllm_worker")
    templates = pod_templates(rs)
    for group in ("draft", "target"):
        assert "/health" in templates[group]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"][-1]

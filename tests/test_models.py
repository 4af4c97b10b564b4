"""Model loading: the embedded default, atomic conversion, missing paths, dtype choice."""

from __future__ import annotations

import pytest
import torch

from specserve import models
from specserve.config import ModelConfig
from specserve.errors import SpecServeError


def test_default_model_is_smollm2_with_its_chat_template(default_dir, tokenizer):
    cfg = (default_dir / "config.json").read_text()
    assert '"num_hidden_layers": 30' in cfg and '"vocab_size": 49152' in cfg
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_interrupted_conversion_leaves_nothing_half_written(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError):
        models.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(SpecServeError, match="not found") as e:
        models.load_model(ModelConfig(model=str(tmp_path / "nope")))
    assert e.value.param == "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecServeError, match="config.json"):
        models.load_model(ModelConfig(model=str(tmp_path / "empty")))


def test_auto_dtype_follows_the_hardware():
    expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32
    assert models.resolve_dtype("auto", "cpu") == expected
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("fp32", "cpu") == torch.float32

"""The real SmolLM2-135M-Instruct in fp32: speculative greedy equals plain greedy and transformers."""

from __future__ import annotations

import pytest
import torch

from specserve.config import DrafterConfig, SamplingParams
from specserve.drafters import make_drafter
from specserve.engine import SpecEngine

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Rewrite this function with clearer names and return it in full:\n\ndef f(a, b):\n    c = a + b\n    d = c * 2\n"
    "    return d",
    "List the planets of the solar system.",
    "What is the capital of France?",
]


def engine(target, kind, k=6, adaptive=True):
    cfg = DrafterConfig(kind=kind, num_speculative_tokens=k, adaptive_k=adaptive)
    return SpecEngine(target, make_drafter(cfg, target), cfg)


def test_real_model_speculative_greedy_equals_plain_and_transformers(real_target):
    params = SamplingParams(max_tokens=32)
    plain = engine(real_target, "none", 0)
    for i, prompt in enumerate(PROMPTS[:2]):
        base = plain.generate(prompt, params, chat=True)
        spec = engine(real_target, "ngram", 6).generate(prompt, params, chat=True)
        assert spec.token_ids == base.token_ids, prompt
        if i == 0:
            # A grounded prompt: n-gram drafts are accepted, so the bonus/rollback paths run on the real model.
            assert spec.stats.num_drafts > 0 and spec.stats.mean_accepted_length > 1.5
            fixed = engine(real_target, "ngram", 3, adaptive=False).generate(prompt, params, chat=True)
            assert fixed.token_ids == base.token_ids
        else:
            ids = real_target.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                            add_generation_prompt=True, return_tensors="pt",
                                                            return_dict=False)
            with torch.inference_mode():
                out = real_target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                                 do_sample=False)
            assert out[0, ids.shape[1]:].tolist() == base.token_ids

"""Tiny randomly initialised models for the tests: fast, with the real tokenizer, written as HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


def make_tiny_model(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a randomly initialised tiny Llama with ``tokenizer`` to ``out_dir`` ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    # A random init gives nearly flat logits; scaling the embeddings makes argmaxes well separated,
    # so fp32 exactness tests are not decided by rounding ties.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "specserve-tiny.json").write_text(json.dumps({"seed": seed}))
    return out_dir

"""Configuration of block drafter training: data, losses, optimisation. Every field says what it does."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from specserve.config import DEFAULT_MODEL, StrictModel
from specserve.drafters.block import BlockDrafterConfig

#: Loss terms by name (see specserve.training.losses).
LOSS_NAMES = ("ce", "positional_ce", "first_error", "chain")

#: The four ablation arms of "Teaching Diffusion to Speculate Left-to-Right" (arXiv 2606.11552).
LOSS_PRESETS: dict[str, dict[str, float]] = {
    "uniform": {"ce": 1.0},
    "positional": {"positional_ce": 1.0},
    "positional+focal": {"positional_ce": 1.0, "first_error": 0.3},
    "all": {"positional_ce": 1.0, "first_error": 0.3, "chain": 40.0},
}


class DataConfig(StrictModel):
    """Where training sequences come from and how the target's hidden states are cached."""

    model: str = Field(DEFAULT_MODEL, description="Target model whose features and tokens the drafter learns.")
    dtype: str = Field("bf16", description="Target dtype for regeneration and features (serving runs bf16).")
    num_conversations: int = Field(640, ge=1, description="ShareGPT train-split conversations to use (first "
                                   "user turn of each, chat template applied).")
    max_prompt_tokens: int = Field(256, ge=8, description="Skip conversations whose templated prompt is longer.")
    max_response_tokens: int = Field(128, ge=2, description="Response tokens kept (and generated) per sequence.")
    regenerate: bool = Field(
        True,
        description="Replace ShareGPT's responses by the target's own greedy responses, so the drafter learns "
        "what the target will actually say (what verification accepts), not what ChatGPT said.",
    )
    generate_batch_size: int = Field(32, ge=1, description="Prompts per batched greedy generate call.")
    shard_size: int = Field(64, ge=1, description="Sequences per cache shard (the unit of resumption).")


class LossConfig(StrictModel):
    """Which loss terms are on, and their weights. Total = sum of weight * term (chain is subtracted)."""

    weights: dict[str, float] = Field(
        default_factory=lambda: dict(LOSS_PRESETS["all"]),
        description="Loss term -> weight. Terms: 'ce' (CE uniform over block positions), 'positional_ce' "
        "(CE weighted by exp(-(k-1)/gamma)), 'first_error' (extra CE at the first position whose argmax is "
        "wrong), 'chain' (mean over k of prod_{j<=k} p_j, subtracted).",
    )
    gamma: float = Field(10.0, gt=0, description="Decay of positional weights w_k = exp(-(k-1)/gamma).")

    @field_validator("weights")
    @classmethod
    def _known_terms(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss {unknown[0]!r}; allowed: {', '.join(LOSS_NAMES)}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one loss term needs a positive weight")
        if any(w < 0 for w in v.values()):
            raise ValueError("loss weights must be >= 0 (the chain term is subtracted by definition)")
        return v


class TrainConfig(StrictModel):
    """One training run of a block drafter."""

    out_dir: Path = Field(Path("out/drafter"), description="Run directory: resumable state, JSON log, "
                          "final checkpoint 'drafter.pt'.")
    data_dir: Path = Field(Path("out/drafter-data"), description="Cache of tokenised sequences and target "
                           "features (shared by runs with the same data config).")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    drafter: BlockDrafterConfig = Field(default_factory=BlockDrafterConfig, description="Drafter shape.")
    losses: LossConfig = Field(default_factory=LossConfig, description="Loss terms and weights.")
    steps: int = Field(300, ge=1, description="Optimiser steps (the training budget; equal across ablation arms).")
    batch_sequences: int = Field(4, ge=1, description="Sequences per step.")
    anchors_per_sequence: int = Field(16, ge=1, description="Blocks drafted per sequence per step, at random "
                                      "response positions (DFlash trains many anchors per sequence).")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and batch sampling (runs are reproducible).")
    save_every: int = Field(25, ge=1, description="Steps between resumable checkpoints.")
    threads: int = Field(1, ge=1, description="torch threads (the machine is shared: 1 by default).")

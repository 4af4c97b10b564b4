"""Hybrid drafting: prompt lookup where the context offers a match, the block drafter elsewhere.

Per sequence and per step, the drafter compares what each source is expected to yield: the
expected accepted length of an n-gram draft (only when the context has a match) and of a block
draft, each a decayed running mean of what verification accepted from that source in this
sequence, divided by the step's cost (one target step, plus one drafting pass for the block
drafter). The larger wins. The n-gram lookup costs nothing, so it is tried first on every step;
the block drafter's context cache is kept up to date on every commit whichever source drafted.

The choice depends only on tokens already committed, never on the verification to come, so
sampling stays lossless: an n-gram block is a deterministic proposal (q = one-hot), a block
drafter's block carries its own q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.config import SamplingParams
from specserve.cost import rate
from specserve.drafters.base import NO_DRAFT, DraftBlock, Drafter, common_prefix_len
from specserve.drafters.block import BlockDrafter
from specserve.drafters.ngram import lookup

#: Prior accepted draft tokens per block before a sequence has shown anything (pseudo-observations).
NGRAM_PRIOR = 1.5
BLOCK_PRIOR = 1.0


@dataclass
class _Source:
    """A decayed running mean of accepted draft tokens per proposed block."""

    mean: float
    weight: float = 1.0  # pseudo-count of the prior

    def update(self, accepted: int, decay: float) -> None:
        self.weight = decay * self.weight + 1.0
        self.mean += (accepted - self.mean) / self.weight


@dataclass
class _SeqState:
    ngram: _Source
    block: _Source
    last_source: str = ""
    last_draft: tuple[int, ...] = ()


class HybridDrafter(Drafter):
    """N-gram lookup or the block drafter, whichever is expected to yield more per unit of cost."""

    name = "hybrid"

    def __init__(self, block: BlockDrafter, ngram_min: int = 1, ngram_max: int = 4, *, decay: float = 0.8,
                 window: int = 8192):
        self.block = block
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.decay = decay
        self.window = window
        self.target_layers = block.target_layers
        # Adaptive k sees the dearer source's cost: it never over-drafts on the block drafter's steps.
        self.draft_cost_per_token = block.draft_cost_per_token
        self.block_pass_cost = block.draft_cost_per_token * block.block_size
        self.states: dict[str, _SeqState] = {}
        #: Blocks drafted by each source over the drafter's life (for benchmarks and tests).
        self.counts = {"ngram": 0, "block": 0}

    def start(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
              target_hidden: torch.Tensor | None = None) -> None:
        self.states[seq_id] = _SeqState(_Source(NGRAM_PRIOR), _Source(BLOCK_PRIOR))
        self.block.start(seq_id, prompt_ids, params, target_hidden)

    def commit(self, seq_id: str, token_ids: list[int], target_hidden: torch.Tensor | None = None) -> None:
        state = self.states.get(seq_id)
        if state is not None and state.last_source:
            # Tokens committed = accepted draft tokens + one recovered or bonus token.
            accepted = min(common_prefix_len(list(state.last_draft), token_ids), max(len(token_ids) - 1, 0))
            getattr(state, state.last_source).update(accepted, self.decay)
            state.last_source, state.last_draft = "", ()
        self.block.commit(seq_id, token_ids, target_hidden)

    def finish(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)
        self.block.finish(seq_id)

    def choose(self, state: _SeqState, has_match: bool) -> str:
        """'ngram' or 'block': the larger expected tokens per step cost (accepted + 1 over cost)."""
        if not has_match:
            return "block"
        # An n-gram lookup costs nothing beside verification; a block costs a drafting pass (specserve.cost).
        ngram_rate = rate(1.0 + state.ngram.mean, 1.0)
        block_rate = rate(1.0 + state.block.mean, 1.0 + self.block_pass_cost)
        return "ngram" if ngram_rate >= block_rate else "block"

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        state = self.states[seq_id]
        if k <= 0:
            return NO_DRAFT
        found = lookup(token_ids[-self.window:], k, self.ngram_min, self.ngram_max)
        source = self.choose(state, bool(found))
        draft = DraftBlock(found) if source == "ngram" else self.block.propose(seq_id, token_ids, k)
        state.last_source, state.last_draft = source, tuple(draft.token_ids)
        self.counts[source] += 1
        return draft

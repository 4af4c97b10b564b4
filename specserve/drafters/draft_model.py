"""Drafting with a small causal LM that shares the target's tokenizer.

Each sequence keeps its own KV cache and the token ids it holds. ``propose`` first feeds
the committed tokens the cache lacks (after a rejection, or the bonus token), then
decodes k tokens one at a time: greedily when the request is greedy, otherwise by
sampling from the same temperature/top-k/top-p distribution the target uses, returning
those distributions as q for the acceptance test. ``commit`` crops the cache to the
longest prefix of the committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from specserve.config import SamplingParams
from specserve.drafters.base import DraftBlock, Drafter, common_prefix_len
from specserve.models import LoadedModel
from specserve.sampling import logits_to_probs, make_generator, sample


@dataclass
class _DraftState:
    cache: DynamicCache
    params: SamplingParams
    generator: torch.Generator | None
    cached_ids: list[int] = field(default_factory=list)


class DraftModelDrafter(Drafter):
    """An HF causal LM as drafter, with per-sequence KV caches."""

    name = "draft_model"

    def __init__(self, draft: LoadedModel, target_num_params: int | None = None):
        self.draft = draft
        self.states: dict[str, _DraftState] = {}
        n_draft = sum(p.numel() for p in draft.model.parameters())
        # Batch-1 decoding is memory-bound: step cost scales roughly with parameter count.
        self.draft_cost_per_token = min(1.0, n_draft / target_num_params) if target_num_params else 0.1

    def start(self, seq_id, prompt_ids, params, target_hidden=None) -> None:
        # A different seed stream from the target's, so draft and verify draws are independent.
        gen = None if params.greedy else make_generator(None if params.seed is None else params.seed + 1)
        self.states[seq_id] = _DraftState(DynamicCache(config=self.draft.model.config), params, gen)

    @torch.inference_mode()
    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        state = self.states[seq_id]
        if k <= 0:
            return DraftBlock([])
        self._rollback(state, token_ids)
        pending = token_ids[len(state.cached_ids) :]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self._feed(state, pending)[-1:]  # [1, vocab]
            if state.params.greedy:
                tok = int(logits.argmax(-1).item())
            else:
                q = logits_to_probs(logits, state.params)[0]  # [vocab]
                tok = sample(q, state.generator)
                probs.append(q)
            tokens.append(tok)
            pending = [tok]
        return DraftBlock(tokens, torch.stack(probs) if probs else None)

    def commit(self, seq_id, token_ids, target_hidden=None) -> None:
        state = self.states.get(seq_id)
        if state is not None:
            self._rollback(state, token_ids)

    def finish(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)

    def _feed(self, state: _DraftState, ids: list[int]) -> torch.Tensor:
        out = self.draft.model(
            input_ids=torch.tensor([ids], device=self.draft.device), past_key_values=state.cache, use_cache=True
        )
        state.cached_ids.extend(ids)
        return out.logits[0]  # [len(ids), vocab]

    @staticmethod
    def _rollback(state: _DraftState, token_ids: list[int]) -> None:
        # Keep at most all-but-the-newest committed token: the next propose must feed something.
        keep = min(common_prefix_len(state.cached_ids, token_ids), len(token_ids) - 1)
        drop = len(state.cached_ids) - keep
        if drop > 0:
            state.cache.crop(-drop)
            del state.cached_ids[keep:]

"""The drafter interface: propose a block for a sequence, then learn what was committed.

A drafter serves many sequences (a draft worker hosts one drafter for all of them), so
every call names the sequence. Implementations keep per-sequence state and roll it back
in ``commit`` to the longest prefix that verification kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.config import SamplingParams


@dataclass
class DraftBlock:
    """Draft tokens for one sequence and, when sampled, the distribution they came from."""

    token_ids: list[int]  # [k'], k' <= k requested (a drafter may propose fewer, even none)
    probs: torch.Tensor | None = None  # [k', vocab] q for each token; None = deterministic proposal

    def truncated(self, k: int) -> DraftBlock:
        """The first ``k`` tokens with their q rows (a drafter may return more than was asked)."""
        n = min(k, len(self.token_ids))
        if n == len(self.token_ids) and (self.probs is None or len(self.probs) == n):
            return self
        return DraftBlock(self.token_ids[:n], self.probs[:n] if self.probs is not None else None)


#: The one empty proposal: drafting off for a step (k = 0, drafter 'none', a request that turned speculation
#: off), so the step is plain decoding. Never mutated.
NO_DRAFT = DraftBlock([])


class Drafter:
    """Base class. Subclasses implement ``propose`` and usually ``start``/``commit``/``finish``."""

    #: Short name used in stats, metrics and CLI output.
    name: str = "drafter"
    #: Estimated cost of drafting one token, as a fraction of one target decode step (adaptive k uses it).
    draft_cost_per_token: float = 0.0
    #: Target layers whose hidden states this drafter conditions on (empty: none).
    target_layers: tuple[int, ...] = ()
    #: True when finished requests change later drafts (a cross-request cache): benchmarks warm it first.
    learns_across_requests: bool = False

    def start(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
              target_hidden: torch.Tensor | None = None) -> None:
        """A new sequence. ``target_hidden``: [len(prompt) - 1, features] when ``target_layers`` is set."""

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        """Propose up to ``k`` tokens to follow ``token_ids`` (prompt + committed output)."""
        raise NotImplementedError

    def commit(self, seq_id: str, token_ids: list[int], target_hidden: torch.Tensor | None = None) -> None:
        """Verification committed ``token_ids`` (prompt + output); roll back any state beyond it.

        ``target_hidden``: features of the positions the target newly kept (all committed tokens
        since the previous call except the newest), when ``target_layers`` is set.
        """

    def finish(self, seq_id: str) -> None:
        """The sequence ended; free its state."""


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

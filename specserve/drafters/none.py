"""The 'none' drafter: proposes nothing, so every step is plain autoregressive decoding.

It runs through the same loop and verifier as every other drafter, which makes it the
baseline all benchmarks compare against.
"""

from __future__ import annotations

from specserve.drafters.base import NO_DRAFT, DraftBlock, Drafter


class NoDrafter(Drafter):
    """Plain decoding through the speculative code path."""

    name = "none"

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        return NO_DRAFT

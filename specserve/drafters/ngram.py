"""Prompt lookup drafting: continue the text the way it continued before.

For the longest suffix n-gram (``ngram_max`` down to ``ngram_min`` tokens) that occurred
earlier in prompt + output, propose the k tokens that followed its most recent earlier
occurrence. No model, no state: rewriting code, quoting the input and repeating lists
draft well; free-form chat rarely matches, and then the step is plain decoding.
"""

from __future__ import annotations

import numpy as np

from specserve.drafters.base import DraftBlock, Drafter


class NgramDrafter(Drafter):
    """Prompt lookup over prompt + generated tokens."""

    name = "ngram"
    draft_cost_per_token = 0.0

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4, window: int = 8192):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.window = window  # only search the most recent tokens: lookup cost stays bounded

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        return DraftBlock(lookup(token_ids[-self.window :], k, self.ngram_min, self.ngram_max))


def lookup(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """The up-to-k tokens following the latest earlier match of the longest matching suffix."""
    n_tokens = len(tokens)
    if k <= 0 or n_tokens < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        # Windows starting at 0 .. n_tokens - n - 1: every earlier occurrence, not the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # [n_tokens - n, n]
        hits = np.flatnonzero((windows == arr[n_tokens - n :]).all(axis=1))
        if hits.size:
            # The most recent occurrence best reflects the current context.
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []

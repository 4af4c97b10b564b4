"""Drafter state keyed by token history, for callers that know no request ids.

vLLM's proposer hook hands over, per running request, only its token history (prompt +
committed output). :class:`HistoryDrafter` maps each history to one of a drafter's
sequence states so a stateful drafter (a draft model with its KV cache) keeps its work
from step to step:

- a history that extends a state's tokens (the usual next step) reuses that state;
- a history that branches off a state's tokens within ``slack`` tokens of its end (a
  rejected draft tail, a pipelined guess that missed) or that is a prefix of them (a
  shorter history after preemption) reuses it too: ``Drafter.commit`` rolls it back;
- any other history gets a fresh state, or an idle state sharing the longest prefix;
- states no history claimed for ``max_idle_calls`` calls are freed, and at most
  ``max_states`` are kept (least recently used go first).

Ray-free: the draft worker actor hosts it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from specserve.config import SamplingParams
from specserve.drafters.base import Drafter

#: Greedy parameters: drafts through vLLM's hook carry no probabilities, so they are argmax proposals.
GREEDY = SamplingParams(temperature=0.0)


@dataclass
class _Entry:
    seq_id: str
    tokens: np.ndarray  # [n] int64: the history this state last drafted after (may include a guessed tail)
    last_call: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class HistoryDrafter:
    """Proposes drafts for a batch of token histories, reusing drafter state across calls."""

    def __init__(self, drafter: Drafter, params: SamplingParams = GREEDY, slack: int = 65,
                 max_states: int = 512, max_idle_calls: int = 32):
        self.drafter = drafter
        self.params = params
        self.slack = slack  # largest rolled-back tail still counted as "the same request"
        self.max_states = max_states
        self.max_idle_calls = max_idle_calls
        self.entries: dict[str, _Entry] = {}
        self.by_tokens: dict[bytes, str] = {}  # entry tokens' bytes -> seq_id: the fast path for extensions
        self.calls = 0
        self._ids = itertools.count()
        self.reused = 0  # histories served from an existing state (for tests and stats)

    def propose_batch(self, histories: list[list[int]], k: int | list[int]) -> list[list[int]]:
        """Up to ``k`` (or ``k[i]``) draft tokens after each history; an empty history gets none."""
        self.calls += 1
        ks = k if isinstance(k, list) else [k] * len(histories)
        claimed: set[str] = set()
        out: list[list[int]] = []
        for history, k_i in zip(histories, ks):
            if not history or k_i <= 0:
                out.append([])
                continue
            arr = np.asarray(history, dtype=np.int64)
            entry = self._claim(arr, claimed)
            claimed.add(entry.seq_id)
            self.drafter.commit(entry.seq_id, history)
            block = self.drafter.propose(entry.seq_id, history, k_i)
            self._set_tokens(entry, arr)
            entry.last_call = self.calls
            out.append([int(t) for t in block.token_ids])
        self._evict()
        return out

    def _claim(self, arr: np.ndarray, claimed: set[str]) -> _Entry:
        # The usual step: the history extends a state's tokens by the accepted drafts and one more token.
        for n in range(len(arr) - 1, max(0, len(arr) - 1 - self.slack), -1):
            seq_id = self.by_tokens.get(arr[:n].tobytes())
            if seq_id is not None and seq_id not in claimed:
                self.reused += 1
                return self.entries[seq_id]
        best, best_lcp = None, -1
        for e in self.entries.values():
            if e.seq_id in claimed:
                continue
            lcp = common_prefix(e.tokens, arr)
            same_request = lcp == len(arr) or lcp >= len(e.tokens) - self.slack
            idle = e.last_call < self.calls - 1
            if (same_request or idle) and lcp > best_lcp:
                best, best_lcp = e, lcp
        if best is not None and best_lcp > 0:
            self.reused += 1
            return best
        seq_id = f"h{next(self._ids)}"
        self.drafter.start(seq_id, arr.tolist(), self.params)
        entry = _Entry(seq_id, arr, self.calls)
        self.entries[seq_id] = entry
        return entry

    def _set_tokens(self, entry: _Entry, arr: np.ndarray) -> None:
        self.by_tokens.pop(entry.tokens.tobytes(), None)
        entry.tokens = arr
        self.by_tokens[arr.tobytes()] = entry.seq_id

    def _evict(self) -> None:
        stale = [e for e in self.entries.values() if e.last_call < self.calls - self.max_idle_calls]
        by_age = sorted(self.entries.values(), key=lambda e: e.last_call)
        stale += by_age[: max(0, len(self.entries) - self.max_states)]
        for e in stale:
            if self.entries.pop(e.seq_id, None) is not None:
                self.by_tokens.pop(e.tokens.tobytes(), None)
                self.drafter.finish(e.seq_id)

    def clear(self) -> None:
        """Free every state."""
        for seq_id in list(self.entries):
            self.drafter.finish(seq_id)
        self.entries.clear()
        self.by_tokens.clear()

    def __len__(self) -> int:
        return len(self.entries)

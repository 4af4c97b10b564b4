"""Draft worker: a Ray actor hosting one core drafter for many sequences.

Thin by design: it holds the drafter and forwards calls. ``step`` combines "learn what was
committed" and "propose the next block" so a block costs the router one actor hop.
"""

from __future__ import annotations

import os

import ray
import torch

from specserve.config import DrafterConfig, ModelConfig, SamplingParams
from specserve.drafters import make_drafter
from specserve.drafters.base import DraftBlock


@ray.remote(max_restarts=-1, max_task_retries=0)
class DraftWorker:
    """Proposes draft blocks; keeps and rolls back per-sequence drafter state."""

    def __init__(self, model_cfg: dict, drafter_cfg: dict, num_threads: int | None = None):
        torch.set_num_threads(num_threads or 1)  # drafting stays cheap beside the target unless told otherwise
        self.drafter_cfg = DrafterConfig.model_validate(drafter_cfg)
        target = None
        if self.drafter_cfg.kind in ("draft_model", "block", "hybrid"):
            # These drafters need the target's tokenizer (and, for 'block'/'hybrid', its embedding and LM head).
            from specserve.models import load_model

            target = load_model(ModelConfig.model_validate(model_cfg))
        self.drafter = make_drafter(self.drafter_cfg, target)  # type: ignore[arg-type]
        self.sequences_started = 0

    def info(self) -> dict:
        """Where this worker runs and what it hosts (used by placement tests and the router)."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "drafter": self.drafter.name,
                "target_layers": list(self.drafter.target_layers),
                "draft_cost_per_token": self.drafter.draft_cost_per_token,
                "sequences_started": self.sequences_started}

    def start(self, seq_id: str, prompt_ids: list[int], params: dict, hidden: torch.Tensor | None = None) -> None:
        """Begin drafting for a sequence."""
        self.sequences_started += 1
        self.drafter.start(seq_id, prompt_ids, SamplingParams.model_validate(params), hidden)

    def step(self, seq_id: str, token_ids: list[int], k: int, hidden: torch.Tensor | None = None) -> DraftBlock:
        """Roll back to ``token_ids`` (prompt + committed output), then propose up to k tokens after it."""
        self.drafter.commit(seq_id, token_ids, hidden)
        return self.drafter.propose(seq_id, token_ids, k)

    def finish(self, seq_id: str) -> None:
        """Free a sequence's drafter state."""
        self.drafter.finish(seq_id)

    def num_sequences(self) -> int:
        """Sequences with drafter state held here (0 when nothing leaks)."""
        return len(getattr(self.drafter, "states", {}))

    def propose_batch(self, histories: list[list[int]], k: int | list[int]) -> list[list[int]]:
        """Greedy drafts of up to ``k`` tokens after each token history, in one call.

        For callers without sequence ids (vLLM's proposer hook): drafter state is found by
        token history (see ``specserve.drafters.history``).
        """
        return self._by_history().propose_batch(histories, k)

    def history_states(self) -> int:
        """Drafter states held for ``propose_batch`` callers (bounded by eviction)."""
        return len(self._by_history())

    def _by_history(self):
        from specserve.drafters.history import HistoryDrafter

        if getattr(self, "_history", None) is None:
            self._history = HistoryDrafter(self.drafter)
        return self._history

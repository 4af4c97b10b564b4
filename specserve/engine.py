"""The in-process speculative decoding engine: one target, one drafter, the loop of ``specserve.step``.

``SpecEngine.generate`` runs :func:`specserve.step.decode` with a local drafter
(:class:`LocalProposer`) and the in-process :class:`specserve.target.Verifier`
(:class:`LocalVerifier`); the Ray router runs the same loop with actor-backed ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.config import DrafterConfig, EngineConfig, SamplingParams
from specserve.cost import PassCost
from specserve.drafters import Drafter, make_drafter
from specserve.drafters.base import DraftBlock
from specserve.models import LoadedModel, load_model
from specserve.sequence import Sequence
from specserve.stats import SpecStats
from specserve.step import decode, run_sync
from specserve.strategy import make_strategy
from specserve.target import StepRequest, StepResult, TreeStepRequest, Verifier
from specserve.tree import DraftTree


@dataclass
class GenerationResult:
    """Output of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    num_prompt_tokens: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per wall-clock second, prefill included."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict: the ``specserve generate --json`` output."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "num_prompt_tokens": self.num_prompt_tokens,
            "stats": self.stats.to_dict(),
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
        }


class LocalProposer:
    """A drafter in this process as a :class:`specserve.step.Proposer`.

    The drafter learns what was committed right before it proposes (one call per step, as on a
    draft worker); target features of the kept positions wait here until then.
    """

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.pending_hidden: dict[str, list[torch.Tensor]] = {}

    async def start(self, seq: Sequence, target_hidden: torch.Tensor | None) -> None:
        self.pending_hidden[seq.seq_id] = []
        self.drafter.start(seq.seq_id, seq.prompt_ids, seq.params, target_hidden)

    async def propose(self, seq: Sequence, k: int) -> DraftBlock:
        pending = self.pending_hidden[seq.seq_id]
        hidden = torch.cat(pending) if pending else None
        pending.clear()
        self.drafter.commit(seq.seq_id, seq.all_ids, hidden)
        return self.drafter.propose(seq.seq_id, seq.all_ids, k)

    def speculate(self, seq: Sequence, block: DraftBlock) -> None:
        """No pipelining in process: drafting and verification share the same CPU."""

    def observe(self, seq: Sequence, block: DraftBlock, result: StepResult) -> None:
        if result.hidden is not None:
            self.pending_hidden[seq.seq_id].append(result.hidden)

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's drafter state."""
        self.pending_hidden.pop(seq.seq_id, None)
        self.drafter.finish(seq.seq_id)


class LocalVerifier:
    """The in-process :class:`specserve.target.Verifier` as a :class:`specserve.step.BlockVerifier`."""

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    async def prefill(self, seq: Sequence) -> torch.Tensor | None:
        return self.verifier.add(seq.seq_id, seq.prompt_ids, seq.params)

    async def verify(self, seq: Sequence, block: DraftBlock | DraftTree) -> StepResult:
        if isinstance(block, DraftTree):
            req = TreeStepRequest(seq.seq_id, seq.last_id, block)
        else:
            req = StepRequest(seq.seq_id, seq.last_id, block.token_ids, block.probs)
        return self.verifier.verify([req])[0]


class SpecEngine:
    """Speculative decoding of one request at a time, in this process."""

    def __init__(self, target: LoadedModel, drafter: Drafter, drafter_cfg: DrafterConfig):
        self.target = target
        self.drafter = drafter
        self.drafter_cfg = drafter_cfg
        self.verifier = Verifier(target, hidden_layers=drafter.target_layers)
        self.info = target.info
        # Measured pass times by width, shared by this engine's requests (adaptive k's cost model).
        self.pass_cost = PassCost(drafter_cfg.verify_cost_per_token)

    @classmethod
    def from_config(cls, cfg: EngineConfig, target: LoadedModel | None = None) -> SpecEngine:
        """Load the target (unless given) and build the drafter ``cfg`` names."""
        target = target or load_model(cfg.model)
        return cls(target, make_drafter(cfg.drafter, target), cfg.drafter)

    def _priced_by_width(self) -> bool:
        """Chains are priced by measured pass times; a tree's pass is as wide as its nodes, not its
        depth, so tree drafters keep the linear prior."""
        return self.drafter_cfg.measured_pass_cost and not self.drafter_cfg.tree.max_nodes

    def with_drafter(self, drafter_cfg: DrafterConfig) -> SpecEngine:
        """Another engine over the same loaded target with a different drafter (for benchmarks)."""
        engine = SpecEngine(self.target, make_drafter(drafter_cfg, self.target), drafter_cfg)
        engine.pass_cost = self.pass_cost  # the same machine: one table of pass times
        return engine

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate a completion; ``on_tokens`` receives each step's committed tokens (streaming)."""
        params = params or SamplingParams()
        t_start = time.perf_counter()
        info = self.info
        prompt_ids = info.encode(prompt, chat=chat)
        info.check_fits(len(prompt_ids))
        seq = Sequence(prompt_ids, params, self.target.tokenizer, info.eos_token_ids)
        proposer = LocalProposer(self.drafter)
        strategy = make_strategy(self.drafter_cfg, self.drafter.draft_cost_per_token,
                                 speculative=params.speculative,
                                 pass_cost=self.pass_cost if self._priced_by_width() else None)
        steps = decode(seq, proposer, LocalVerifier(self.verifier), strategy, info.max_context)
        try:
            while True:
                try:
                    outcome = run_sync(steps.__anext__())
                except StopAsyncIteration:
                    break
                if on_tokens and outcome.appended:
                    on_tokens(outcome.appended)
        finally:
            self.verifier.free(seq.seq_id)
            proposer.finish(seq)
        return GenerationResult(
            text=seq.text,
            token_ids=seq.output_ids,
            finish_reason=seq.finish_reason or "stop",
            stats=seq.stats,
            num_prompt_tokens=len(prompt_ids),
            elapsed_s=time.perf_counter() - t_start,
        )

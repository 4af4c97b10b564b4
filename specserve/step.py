"""The decode loop, written once: propose a block, verify it in one target pass, commit.

One step (gpt-fast's shape; the math lives in ``sampling.verify_block``)::

    k      = min(strategy.next_k(), room)       # adaptive or fixed block length, never past the end
    block  = await proposer.propose(seq, k)     # k' <= k draft tokens (+ q when sampling)
    proposer.speculate(seq, block)              # optional: draft the next block during verification
    result = await verifier.verify(seq, block)  # one target pass, accept/reject, KV rollback
    seq.commit(result.verdict.tokens)           # accepted + recovered/bonus token, stop conditions
    proposer.observe(seq, block, result)        # what was kept (and target features) for the next propose

:func:`decode` runs it over two small protocols. The in-process engine passes a local
drafter and :class:`specserve.target.Verifier`; the Ray router passes draft-worker and
target-group implementations (batching, pipelining and fault handling live in those).
Both are async so that one loop serves both; the in-process implementations never
suspend, so :func:`run_sync` drives the loop without an event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from specserve.drafters.base import NO_DRAFT, DraftBlock
from specserve.sequence import Sequence
from specserve.strategy import KStrategy
from specserve.target import StepResult
from specserve.tree import DraftTree

T = TypeVar("T")

class Proposer(Protocol):
    """Something that drafts blocks for sequences."""

    async def start(self, seq: Sequence, target_hidden: torch.Tensor | None) -> None:
        """A new sequence after prefill (``target_hidden``: prompt features, for drafters that use them)."""

    async def propose(self, seq: Sequence, k: int) -> DraftBlock:
        """Up to ``k`` draft tokens to follow ``seq.all_ids`` (fewer or none is fine)."""

    def speculate(self, seq: Sequence, block: DraftBlock) -> None:
        """Verification of ``block`` is starting: a pipelined proposer may draft the next block now."""

    def observe(self, seq: Sequence, block: DraftBlock, result: StepResult) -> None:
        """``block`` was verified and ``seq`` committed the verdict; learn what was kept."""


class BlockVerifier(Protocol):
    """Something that checks blocks with the target model."""

    async def prefill(self, seq: Sequence) -> torch.Tensor | None:
        """Build the sequence's target state; return prompt features when a drafter needs them."""

    async def verify(self, seq: Sequence, block: DraftBlock) -> StepResult:
        """Verify ``[seq.last_id] + block`` in one target pass and roll the target state back."""


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, for streaming and metrics."""

    appended: list[int]  # tokens committed (after stop conditions)
    num_draft: int  # draft tokens verified (0 = a plain decoding step)
    num_accepted: int  # of those, how many the target accepted
    draft_s: float  # wall time spent obtaining the draft
    verify_s: float  # target time of the verification pass


def room_left(seq: Sequence, max_context: int) -> int:
    """Draft tokens that could still be kept: never draft past max_tokens or the context.

    A step always commits one target token after the draft, hence the ``- 1``s.
    """
    return min(seq.remaining - 1, max_context - len(seq.prompt_ids) - len(seq.output_ids) - 1)


async def decode(seq: Sequence, proposer: Proposer, verifier: BlockVerifier, strategy: KStrategy,
                 max_context: int) -> AsyncIterator[StepOutcome]:
    """Generate ``seq`` to its end, yielding each step's outcome. Statistics land in ``seq.stats``."""
    stats = seq.stats
    t0 = time.perf_counter()
    hidden = await verifier.prefill(seq)
    stats.prefill_time_s += time.perf_counter() - t0
    await proposer.start(seq, hidden)
    while not seq.finished:
        room = room_left(seq, max_context)
        if room < 0:
            seq.abort("length")
            break
        k = min(strategy.next_k(), room)
        t0 = time.perf_counter()
        block = (await proposer.propose(seq, k)).truncated(k) if k > 0 else NO_DRAFT
        draft_s = time.perf_counter() - t0
        if len(block.token_ids) < room:  # a block that fills the room has no successor to pipeline
            proposer.speculate(seq, block)
        result = await verifier.verify(seq, block)
        num_draft, num_accepted = len(block.token_ids), result.verdict.num_accepted
        if result.num_verified is not None:  # the verifier checked a prefix of the block (still lossless)
            num_draft = result.num_verified
        stats.record(num_draft, num_accepted)
        stats.draft_time_s += draft_s
        stats.verify_time_s += result.verify_time_s
        strategy.update(num_draft, num_accepted)
        if not isinstance(block, DraftTree):  # a tree's pass is as wide as its nodes, not its depth
            strategy.observe_pass(num_draft + 1, result.verify_time_s)
        appended = seq.commit(result.verdict.tokens)
        if not seq.finished:
            proposer.observe(seq, block, result)
        yield StepOutcome(appended, num_draft, num_accepted, draft_s, result.verify_time_s)


def run_sync(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends (in-process proposer and verifier), without an event loop."""
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: the coroutine suspended; run it on an event loop instead")

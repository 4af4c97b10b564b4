"""Batches the verification requests of one target group into passes.

Every sequence decoding on a group submits one block per step; verifying them one by one would
run a forward pass per sequence, so :class:`Batcher` collects what is queued and verifies it in
one padded pass (up to ``max_batch`` sequences). A pass waits briefly (``wait_fraction`` of the
mean pass time) for the group's members whose blocks are still on the way, so that one step of
every sequence is one pass rather than a full pass followed by a nearly empty one, and it cuts
drafts to the common length that pays (rows are padded to the longest input).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import RayError

from actors.metrics import RouterMetrics
from actors.target_worker import TargetGroup
from specserve.cost import VerifyCost, pass_draft_length
from specserve.errors import TargetFailed
from specserve.target import StepRequest, TreeStepRequest


@dataclass
class _Pending:
    req: StepRequest | TreeStepRequest
    future: asyncio.Future
    generation: int  # the group's generation when submitted: its KV caches live only in that generation
    alpha: float | None = None  # the sequence's acceptance estimate when its draft may be cut (see pass_draft_length)


class Batcher:
    """Collects verification requests for one target group and runs them as batched passes.

    The loop never dies: a failed pass fails its requests (and everything queued for the same,
    now broken, generation of the group) with ``TargetFailed``; later requests run on the
    rebuilt group.
    """

    def __init__(self, group: TargetGroup, max_batch: int, on_failure, cost: VerifyCost, metrics: RouterMetrics,
                 wait_fraction: float = 0.0, *, clock: Callable[[], float] = time.perf_counter):
        self.group = group
        self.metrics = metrics
        self.cost = cost
        self.max_batch = max_batch
        self.wait_fraction = wait_fraction
        self.members: set[str] = set()  # sequences decoding on this group: each will submit one block per step
        self.pass_s = 0.0  # running mean of a pass's duration: bounds the wait for late members
        self.queue: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.on_failure = on_failure
        self.clock = clock  # times passes and the wait for late members (tests pass their event loop's clock)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def join(self, seq_id: str) -> None:
        """``seq_id`` prefilled on this group and will submit a block every step until it leaves."""
        self.members.add(seq_id)

    def leave(self, seq_id: str) -> None:
        """``seq_id`` finished (or failed): passes stop waiting for it."""
        self.members.discard(seq_id)
        self.wakeup.set()

    def submit(self, req: StepRequest | TreeStepRequest, alpha: float | None = None) -> asyncio.Future:
        """Queue ``req`` for the next pass; with ``alpha``, its draft may be cut to the pass's best length."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(req, fut, self.group.generation, alpha))
        self.wakeup.set()
        return fut

    def _cut_drafts(self, batch: list[_Pending]) -> dict[int, int]:
        """Cut drafts to the pass's best common length (inputs are padded to the longest); {index: verified}."""
        if len(batch) < 2:
            return {}
        drafts = [(_num_inputs(p.req) - 1, p.alpha if isinstance(p.req, StepRequest) else None) for p in batch]
        length = pass_draft_length(drafts, self.cost.ratio())
        cut = {}
        for i, p in enumerate(batch):
            req = p.req
            if isinstance(req, StepRequest) and p.alpha is not None and len(req.draft_tokens) > length:
                probs = req.draft_probs[:length] if req.draft_probs is not None else None
                p.req = StepRequest(req.seq_id, req.last_id, list(req.draft_tokens[:length]), probs)
                cut[i] = length
        return cut

    async def _gather(self) -> None:
        """Wait (boundedly) until every member's block is queued, so one step of all of them is one pass.

        A member is late when its draft is still on the way from a draft worker or its client is slow
        to take its last chunk; a pass that left it behind would be followed by a second, nearly empty
        one. The wait ends at ``wait_fraction`` of the mean pass time: a member slower than that joins
        the next pass.
        """
        if self.wait_fraction <= 0 or self.pass_s <= 0:
            return
        deadline = self.clock() + self.wait_fraction * self.pass_s
        while len(self.queue) < self.max_batch:
            queued = {p.req.seq_id for p in self.queue}
            if not self.members - queued:
                return
            left = deadline - self.clock()
            if left <= 0:
                return
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except TimeoutError:
                return

    @staticmethod
    def _fail(pending: list[_Pending], message: str) -> None:
        for p in pending:
            if not p.future.done():
                p.future.set_exception(TargetFailed(message))

    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                # Let sequences whose drafts just arrived join this pass, and wait briefly for late ones.
                await asyncio.sleep(0)
                await self._gather()
                stale = [p for p in self.queue if p.generation != self.group.generation or not self.group.ranks]
                if stale:
                    self._fail(stale, "target group failed during this request")
                    self.queue = [p for p in self.queue if p not in stale]
                    continue
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
                cut = self._cut_drafts(batch)
                t0 = self.clock()
                try:
                    results = await self.group.step_batch([p.req for p in batch])
                except Exception as e:  # noqa: BLE001 - whatever broke the pass, the loop must live on
                    self._fail(batch, f"target worker failed during generation: {e}")
                    # Any rank's failure breaks the group, whichever error comes back first: a rank that died
                    # (RayActorError), or a live rank whose collective lost its peer (RayTaskError). Either
                    # way the ranks are out of lockstep and their caches unknown.
                    if isinstance(e, RayError):
                        self._fail(self.queue, "target group failed during this request")
                        self.queue = []
                        await self.on_failure(self.group)
                    continue
                seconds = self.clock() - t0
                self.metrics.verify_pass(len(batch))
                # Rows are padded to the longest input: the pass computes batch x widest tokens.
                self.cost.observe(len(batch) * max(_num_inputs(p.req) for p in batch), seconds)
                self.pass_s = seconds if self.pass_s <= 0 else 0.9 * self.pass_s + 0.1 * seconds
                for i, (p, r) in enumerate(zip(batch, results)):
                    if i in cut:
                        r.num_verified = cut[i]
                    if not p.future.done():
                        p.future.set_result(r)



def _num_inputs(req: StepRequest | TreeStepRequest) -> int:
    """Tokens a request feeds the target's pass: the newest token and its draft (chain or tree nodes)."""
    return 1 + (len(req.tree) if isinstance(req, TreeStepRequest) else len(req.draft_tokens))

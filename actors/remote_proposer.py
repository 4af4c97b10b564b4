"""The draft-worker proposer of the router's requests.

:class:`RemoteProposer` is a :class:`actors.draft_worker.DraftWorker` as the
:class:`specserve.step.Proposer` of one request (one actor hop per block, pipelined drafting of the
next block while the current one is verified, plain decoding while the worker is down). A request
without a draft worker decodes through :class:`specserve.engine.LocalProposer` with the 'none' drafter.
"""

from __future__ import annotations

import logging

import torch
from ray.exceptions import RayError

from actors.calls import submit
from actors.metrics import RouterMetrics
from specserve.drafters.base import NO_DRAFT, DraftBlock
from specserve.sequence import Sequence
from specserve.target import StepResult
from specserve.tree import DraftTree, below

log = logging.getLogger("specserve.router")

#: After a draft worker failure, a sequence retries drafting every this many plain steps.
REATTACH_EVERY = 8


class RemoteProposer:
    """A draft worker as a :class:`specserve.step.Proposer` for one request.

    One actor hop per block: the worker learns what was committed and proposes in the same
    call. A failed call turns the request to plain decoding; it re-attaches every
    ``REATTACH_EVERY`` steps (not for drafters that need target features it has lost).
    With ``pipelining``, ``speculate`` drafts the next block during verification.
    """

    def __init__(self, worker, params: dict, metrics: RouterMetrics, *, pipelining: bool, needs_features: bool):
        self.worker = worker
        self.params = params
        self.metrics = metrics
        self.pipelining = pipelining
        self.needs_features = needs_features
        self.attached = False
        self.plain_steps = 0
        self.pending_hidden: list[torch.Tensor] = []
        self.last_k = 0
        self.speculative = None  # ObjectRef of a block drafted assuming the one in verification is all accepted
        self.ready: tuple[object, int] | None = None  # (that ref, the bonus token it must start with)

    async def start(self, seq: Sequence, target_hidden: torch.Tensor | None) -> None:
        await self._attach(seq, target_hidden)

    async def _attach(self, seq: Sequence, target_hidden: torch.Tensor | None) -> None:
        try:
            await submit(self.worker.start, seq.seq_id, seq.all_ids, self.params, target_hidden)
            self.attached = True
        except RayError:
            self.metrics.draft_failure()
            self.attached = False

    async def propose(self, seq: Sequence, k: int) -> DraftBlock | DraftTree:
        self.last_k = k
        if self.ready is not None:
            block = await self._take_pipelined(seq)
            if block is not None:
                return block
        if not self.attached:
            self.plain_steps += 1
            if self.needs_features or self.plain_steps % REATTACH_EVERY:
                return NO_DRAFT
            await self._attach(seq, None)
            if not self.attached:
                return NO_DRAFT
        hidden = torch.cat(self.pending_hidden) if self.pending_hidden else None
        try:
            block = await submit(self.worker.step, seq.seq_id, seq.all_ids, k, hidden)
        except RayError:
            log.warning("draft worker failed; %s continues with plain decoding", seq.seq_id)
            self.metrics.draft_failure()
            self.attached = False
            return NO_DRAFT
        self.pending_hidden.clear()
        return block

    async def _take_pipelined(self, seq: Sequence) -> DraftBlock | DraftTree | None:
        ref, bonus = self.ready
        self.ready = None
        try:
            block = await ref
        except RayError:
            return None
        if isinstance(block, DraftTree):  # a tree drafted after the assumed path: its branch under the bonus
            rest = below(block, bonus)
            if not rest:
                return None
            next_block: DraftBlock | DraftTree = rest
        elif len(block.token_ids) < 2 or block.token_ids[0] != bonus:
            return None
        else:
            next_block = DraftBlock(block.token_ids[1:], block.probs[1:] if block.probs is not None else None)
        seq.stats.num_pipelined_drafts += 1
        self.metrics.pipelined_draft()
        return next_block

    def speculate(self, seq: Sequence, block: DraftBlock) -> None:
        if self.pipelining and self.attached and block.token_ids:
            self.speculative = submit(self.worker.step, seq.seq_id, seq.all_ids + block.token_ids,
                                                       self.last_k + 1, None)

    def observe(self, seq: Sequence, block: DraftBlock, result: StepResult) -> None:
        if result.hidden is not None:
            self.pending_hidden.append(result.hidden)
        ref, self.speculative = self.speculative, None
        # The pipelined block followed the path speculate() assumed (a tree's main path): usable only if
        # verification accepted exactly that path.
        if ref is not None and result.verdict.tokens[:-1] == block.token_ids:
            self.ready = (ref, result.verdict.tokens[-1])

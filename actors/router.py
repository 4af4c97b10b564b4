"""The router: owns request state and runs the core's decode loop with each piece on its actor.

Per request it runs :func:`specserve.step.decode` with a
:class:`actors.remote_proposer.RemoteProposer` (a draft worker), or the router's own
:class:`specserve.engine.LocalProposer` for model-free drafters (``topology.draft_placement``),
and a :class:`GroupVerifier` (a target group). Verification requests of many sequences on one
target group are batched into one forward pass by :class:`actors.batcher.Batcher`, which waits
briefly for members whose blocks are still on the way.
With pipelining, while block B is being verified the draft worker already drafts the block
after B assuming B is fully accepted; if verification accepts all of B and the target's
bonus token equals that block's first token, the rest of it is the next draft, ready
without waiting (AMUSD / PEARL style overlap). Otherwise it is discarded.

Faults: a draft worker that dies is restarted by Ray; its sequences continue with plain
target decoding and re-attach to the restarted worker later. A target rank that dies
ends its group's in-flight requests with an error; the group is rebuilt for later ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayError

from actors.batcher import Batcher
from actors.calls import submit
from actors.config import ReplicaConfig
from actors.core import ReplicaCore, least_loaded, pipelining_pays
from actors.draft_worker import DraftWorker
from actors.metrics import RouterMetrics
from actors.remote_proposer import RemoteProposer
from actors.streaming import RequestStream
from actors.suffix_hub import DrafterCache, SuffixSync, hub_name
from actors.target_worker import TargetGroup
from cluster.placement import actor_options
from specserve.config import SamplingParams
from specserve.cost import VerifyCost
from specserve.drafters import make_drafter
from specserve.drafters.base import DraftBlock
from specserve.drafters.none import NoDrafter
from specserve.engine import LocalProposer
from specserve.errors import TargetFailed
from specserve.models import ModelInfo
from specserve.outputs import StreamChunk
from specserve.sequence import Sequence
from specserve.step import Proposer, decode
from specserve.strategy import AdaptiveK, KStrategy, make_strategy
from specserve.target import StepRequest, StepResult, TreeStepRequest
from specserve.tree import DraftTree, check_budget

log = logging.getLogger("specserve.router")


class GroupVerifier:
    """A target group, through its batcher, as a :class:`specserve.step.BlockVerifier` for one request.

    A group rebuilt while the request runs (a rank died) ends the request with ``TargetFailed``:
    its KV cache went with the old ranks.
    """

    def __init__(self, router: RouterCore, group: TargetGroup, params: dict, strategy: KStrategy | None = None):
        self.router = router
        self.group = group
        self.params = params
        self.strategy = strategy  # an adaptive one lets the batcher cut this sequence's drafts
        self.generation = 0

    async def prefill(self, seq: Sequence) -> torch.Tensor | None:
        group = self.group
        if group.index in self.router.rebuilding:
            await self.router.rebuilding[group.index]
        self.generation = group.generation
        try:
            hidden = await group.add(seq.seq_id, seq.prompt_ids, self.params)
        except RayError as e:
            await self.router.group_failed(group)
            raise TargetFailed(f"target worker failed during prefill: {e}") from None
        self.router.batchers[group.index].join(seq.seq_id)
        return hidden

    async def verify(self, seq: Sequence, block: DraftBlock | DraftTree) -> StepResult:
        if self.group.generation != self.generation or self.group.index in self.router.rebuilding:
            raise TargetFailed("target group failed during this request")
        req = (TreeStepRequest(seq.seq_id, seq.last_id, block) if isinstance(block, DraftTree)
               else StepRequest(seq.seq_id, seq.last_id, block.token_ids, block.probs))
        strategy = self.strategy
        cuttable = isinstance(strategy, AdaptiveK) and not strategy.probing  # probes keep their exploration
        fut = self.router.batchers[self.group.index].submit(req, strategy.alpha if cuttable else None)
        result: StepResult = await fut
        if self.group.generation != self.generation:
            raise TargetFailed("target group was rebuilt during this request")
        return result


@dataclass
class _Request:
    """What the router holds for one running request."""

    seq: Sequence
    group: TargetGroup
    worker_index: int | None  # draft worker serving it (None: plain decoding)
    strategy: KStrategy
    stream: RequestStream  # builds its chunks and token timing metrics


class RouterCore(ReplicaCore):
    """Engine hf: request state and the distributed decode loop (draft workers, target groups)."""

    def __init__(self, config: ReplicaConfig):
        self.config = config
        self.info = ModelInfo.load(config.model, config.max_model_len)
        self.tokenizer = self.info.tokenizer
        self.metrics = RouterMetrics(config.model_name)
        self.requests: dict[str, _Request] = {}
        self.running = asyncio.Semaphore(config.router.max_running_requests)
        self.num_waiting = 0
        self.groups: list[TargetGroup] = []
        self.batchers: dict[int, Batcher] = {}
        self.workers: list = []
        self.worker_info: dict = {}
        self.local_proposer: LocalProposer | None = None  # the router's own drafter (draft_placement 'router')
        self.plain_proposer = LocalProposer(NoDrafter())  # requests without a draft worker: plain decoding
        self.suffix_sync: SuffixSync | None = None  # the suffix cache shared with the other replicas
        self.rebuilding: dict[int, asyncio.Task] = {}
        self._request_numbers = itertools.count()  # names requests that come without an id
        self._worker_turns = itertools.count()  # round robin over draft workers
        self._cleanups: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start draft workers and target groups (where the topology says) and wait until they are ready."""
        cfg = self.config
        topo = cfg.topology
        use_drafter = cfg.drafter.kind != "none" and cfg.drafter.num_speculative_tokens > 0
        model_json = cfg.model.model_dump(mode="json")
        if cfg.drafter.tree.max_nodes and use_drafter:
            check_budget(cfg.drafter.tree, self.info.max_context)  # before any actor starts
        if cfg.drafts_in_router:
            drafter = make_drafter(cfg.drafter, None)  # type: ignore[arg-type]  # model-free: needs no target
            self.local_proposer = LocalProposer(drafter)
            self.worker_info = {"drafter": drafter.name, "target_layers": [],
                                "draft_cost_per_token": drafter.draft_cost_per_token}
            if cfg.drafter.suffix_shared_cache:
                suffix = getattr(drafter, "inner", drafter)  # a TreeDrafter drafts trees from the suffix drafter
                self.suffix_sync = SuffixSync(DrafterCache(suffix), hub_name(cfg.model.model),
                                              cfg.drafter.suffix_cache_requests)
                self.suffix_sync.start()
        elif use_drafter:
            self.workers = [
                DraftWorker.options(**actor_options(topo.draft_worker)).remote(
                    model_json, cfg.drafter.model_dump(mode="json"), topo.draft_worker.num_threads)
                for _ in range(topo.num_draft_workers)
            ]
        if self.workers:
            self.worker_info = await submit(self.workers[0].info)
        hidden_layers = tuple(self.worker_info.get("target_layers", ()))
        self.groups = [TargetGroup(i, cfg.model, topo, hidden_layers) for i in range(topo.num_target_groups)]
        await asyncio.gather(*[g.build() for g in self.groups])
        for g in self.groups:
            self.batchers[g.index] = Batcher(g, cfg.router.max_batch_size if cfg.router.batching else 1,
                                             self.group_failed, VerifyCost(cfg.drafter.verify_cost_per_token),
                                             self.metrics,
                                             cfg.router.batch_wait_fraction if cfg.router.batching else 0.0)

    # ----------------------------------------------------------------------------------------- API

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Decode one request, yielding a :class:`StreamChunk` per step; the last one has finish_reason.

        Raises ``SpecServeError`` (bad input), ``Saturated`` (queue full) or ``TargetFailed``.
        """
        self.info.check_fits(len(prompt_ids))
        self.admit(len(self.requests) + self.num_waiting)
        if params.seed is None:
            # Every rank of a TP group must draw the same random numbers: the router picks the seed.
            params = params.model_copy(update={"seed": random.getrandbits(62)})
        t_arrival = time.perf_counter()
        self.num_waiting += 1
        self.metrics.set_queue(len(self.requests), self.num_waiting)
        try:
            await self.running.acquire()
        finally:
            self.num_waiting -= 1
        seq_id = request_id or f"req-{next(self._request_numbers)}"
        group = least_loaded(self.groups, lambda g: sum(r.group is g for r in self.requests.values()))
        worker_index = next(self._worker_turns) % len(self.workers) if self.workers else None
        seq = Sequence(prompt_ids, params, self.tokenizer, self.info.eos_token_ids, seq_id=seq_id)
        req = _Request(seq, group, worker_index,
                       make_strategy(self.config.drafter, self.worker_info.get("draft_cost_per_token", 0.0),
                                     self._load_aware_cost(group), speculative=params.speculative),
                       RequestStream(seq, self.metrics, t_arrival))
        self.requests[seq_id] = req
        self.metrics.set_queue(len(self.requests), self.num_waiting)
        self.metrics.prompt_tokens(len(prompt_ids))
        try:
            async for chunk in self._decode(req):
                yield chunk
        finally:
            self._release(req)

    def _load_aware_cost(self, group: TargetGroup):
        """Verification cost per draft token on ``group`` at its current batch size (read every step)."""
        cost, max_batch = self.batchers[group.index].cost, self.batchers[group.index].max_batch

        def per_token() -> float:
            running = sum(r.group is group for r in self.requests.values())
            return cost.per_token(min(running, max_batch))

        return per_token

    def status(self) -> dict:
        """Live counts, for health checks and leak tests."""
        return {"running": len(self.requests), "waiting": self.num_waiting,
                "groups": [{"index": g.index, "generation": g.generation, "ranks": len(g.ranks)} for g in self.groups],
                "draft_workers": len(self.workers), "max_context": self.info.max_context,
                **({"suffix_shared_received": self.suffix_sync.received} if self.suffix_sync else {})}

    async def held_sequences(self) -> dict:
        """Sequences held by every worker and rank 0 of every group (all 0 when idle)."""
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        drafts = await asyncio.gather(*[submit(w.num_sequences) for w in self.workers], return_exceptions=True)
        targets = await asyncio.gather(*[g.num_sequences() for g in self.groups], return_exceptions=True)
        return {"router": len(self.requests),
                "router_drafter": len(self.plain_proposer.pending_hidden)
                + (len(self.local_proposer.pending_hidden) if self.local_proposer else 0),
                "draft_workers": [d if isinstance(d, int) else -1 for d in drafts],
                "target_groups": [t if isinstance(t, int) else -1 for t in targets]}

    async def placement(self) -> dict:
        """Node of every draft worker and target rank (a worker being restarted shows its error instead)."""
        drafts = await asyncio.gather(*[submit(w.info) for w in self.workers], return_exceptions=True)
        drafts = [d if isinstance(d, dict) else {"pid": None, "unavailable": type(d).__name__} for d in drafts]
        return {"draft_workers": drafts, "target_groups": [g.infos for g in self.groups]}

    def healthy(self) -> bool:
        """False when a target group has lost its ranks and is not being rebuilt."""
        return bool(self.groups) and all(g.ranks for g in self.groups if g.index not in self.rebuilding)

    # ---------------------------------------------------------------------------------- the loop

    async def _decode(self, req: _Request) -> AsyncIterator[StreamChunk]:
        seq = req.seq
        params = seq.params.model_dump(mode="json")
        needs_features = bool(self.worker_info.get("target_layers"))
        pipelining = (self.config.router.pipelining and not needs_features
                      and pipelining_pays(None, self.worker_info.get("draft_cost_per_token", 0.0)))
        proposer: Proposer
        if self.local_proposer is not None:
            proposer = self.local_proposer
        elif req.worker_index is None:
            proposer = self.plain_proposer
        else:
            proposer = RemoteProposer(self.workers[req.worker_index], params, self.metrics,
                                      pipelining=pipelining, needs_features=needs_features)
        verifier = GroupVerifier(self, req.group, params, req.strategy)
        batcher = self.batchers[req.group.index]
        try:
            async for out in decode(seq, proposer, verifier, req.strategy, self.info.max_context):
                if seq.finished:  # before the chunk goes out: the next pass must not wait for this sequence
                    batcher.leave(seq.seq_id)
                self.metrics.step(out.num_draft, out.num_accepted, out.draft_s, out.verify_s)
                yield req.stream.chunk(out.appended)
        finally:
            batcher.leave(seq.seq_id)
        if not req.stream.finished:  # ended without a step (e.g. the context was already full)
            yield req.stream.chunk([])

    def _release(self, req: _Request) -> None:
        """Drop the request's state here at once, and on the workers in the background.

        Runs from ``finally`` of a generator that may be closing because its client went away:
        the remote frees are a separate task so a second cancellation cannot cut them short.
        """
        seq_id = req.seq.seq_id
        if self.requests.pop(seq_id, None) is None:
            return
        self.running.release()
        self.metrics.set_queue(len(self.requests), self.num_waiting)
        if self.local_proposer is not None:
            self.local_proposer.finish(req.seq)
        elif req.worker_index is None:
            self.plain_proposer.finish(req.seq)
        task = asyncio.get_running_loop().create_task(self._free_remote(req))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _free_remote(self, req: _Request) -> None:
        seq_id = req.seq.seq_id
        if req.worker_index is not None:
            try:
                await submit(self.workers[req.worker_index].finish, seq_id)
            except RayError:
                pass
        try:
            await req.group.free([seq_id])
        except RayError:
            pass

    async def group_failed(self, group: TargetGroup) -> None:
        """Rebuild a group whose rank died (once, however many requests noticed)."""
        if group.index in self.rebuilding or group.closed:
            return
        log.error("target group %d failed; rebuilding", group.index)

        async def rebuild():
            try:
                await group.rebuild()
            finally:
                self.rebuilding.pop(group.index, None)

        self.rebuilding[group.index] = asyncio.get_running_loop().create_task(rebuild())

    def shutdown(self) -> None:
        """Stop every actor this router started, and any rebuild under way (it releases what it reserved)."""
        for task in self.rebuilding.values():
            task.cancel()
        if self.suffix_sync is not None:
            self.suffix_sync.stop()
        for g in self.groups:
            g.shutdown()
        for w in self.workers:
            ray.kill(w, no_restart=True)

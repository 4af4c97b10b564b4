"""The router: owns request state, moves blocks between draft workers and verifier groups.

Per request it runs the core's step (strategy -> draft -> verify -> commit) with each piece
on its actor. Verification requests of many sequences on one target group are batched
into one forward pass. With pipelining, while block B is being verified the draft worker
already drafts the block after B assuming B is fully accepted; if verification accepts
all of B and the target's bonus token equals that block's first token, the rest of it is
the next draft, ready without waiting (AMUSD / PEARL style overlap). Otherwise it is
discarded.

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
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import RayActorError, RayError
from transformers import AutoTokenizer

from actors.draft_worker import DraftWorker
from actors.metrics import RouterMetrics
from actors.target_worker import TargetGroup
from cluster.placement import actor_options
from deployments.config import AppConfig
from specserve.config import SamplingParams
from specserve.errors import SpecServeError
from specserve.models import resolve_model_path
from specserve.sequence import Sequence
from specserve.strategy import KStrategy, make_strategy
from specserve.target import StepRequest, StepResult

log = logging.getLogger("specserve.router")

#: After a draft worker failure, a sequence retries drafting every this many plain steps.
REATTACH_EVERY = 8


class Saturated(Exception):
    """The router's queue is full: the caller should answer HTTP 503."""


class TargetFailed(Exception):
    """A target rank died while verifying this request's block."""


@dataclass
class _Pending:
    req: StepRequest
    future: asyncio.Future


class _Batcher:
    """Collects verification requests for one target group and runs them as batched passes."""

    def __init__(self, group: TargetGroup, max_batch: int, on_failure):
        self.group = group
        self.max_batch = max_batch
        self.queue: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.on_failure = on_failure
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, req: StepRequest) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(req, fut))
        self.wakeup.set()
        return fut

    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                # Let sequences whose drafts just arrived join this pass.
                await asyncio.sleep(0)
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
                try:
                    results = await self.group.step_batch([p.req for p in batch])
                except RayError as e:
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(TargetFailed(str(e)))
                    if isinstance(e, RayActorError):  # a rank died: the process group is broken
                        await self.on_failure(self.group)
                    continue
                for p, r in zip(batch, results):
                    if not p.future.done():
                        p.future.set_result(r)


@dataclass
class _Request:
    seq: Sequence
    params_dict: dict
    group: TargetGroup
    worker_index: int | None
    t_arrival: float
    strategy: KStrategy
    pending_hidden: list[torch.Tensor] = field(default_factory=list)
    emitted_chars: int = 0
    t_last_token: float = 0.0


class RouterCore:
    """Request state and the distributed decode loop. Hosted by the Serve router deployment."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.model, config.model.cache_dir))
        self.metrics = RouterMetrics(config.serve.model_name)
        self.requests: dict[str, _Request] = {}
        self.running = asyncio.Semaphore(config.router.max_running_requests)
        self.num_waiting = 0
        self.groups: list[TargetGroup] = []
        self.batchers: dict[int, _Batcher] = {}
        self.workers: list = []
        self.worker_info: dict = {}
        self.rebuilding: dict[int, asyncio.Task] = {}
        self._ids = itertools.count()
        self.eos_ids: set[int] = set()
        self.max_context = 0
        self._cleanups: set[asyncio.Task] = set()
        self.pipelined_blocks = 0  # drafts that were ready when verification ended (the overlap paid)

    async def start(self) -> None:
        """Start draft workers and target groups (where the topology says) and wait until they are ready."""
        cfg = self.config
        topo = cfg.topology
        use_drafter = cfg.drafter.kind != "none" and cfg.drafter.num_speculative_tokens > 0
        model_json = cfg.model.model_dump(mode="json")
        if use_drafter:
            self.workers = [
                DraftWorker.options(**actor_options(topo.draft_worker)).remote(
                    model_json, cfg.drafter.model_dump(mode="json"), topo.draft_worker.num_threads)
                for _ in range(topo.num_draft_workers)
            ]
        if self.workers:
            self.worker_info = await self.workers[0].info.remote()
        hidden_layers = tuple(self.worker_info.get("target_layers", ()))
        self.groups = [TargetGroup(i, cfg.model, topo, hidden_layers) for i in range(topo.num_target_groups)]
        await asyncio.gather(*[g.build() for g in self.groups])
        self.max_context = self.groups[0].infos[0]["max_context"]
        if cfg.serve.max_model_len:
            self.max_context = min(self.max_context, cfg.serve.max_model_len)
        for g in self.groups:
            self.batchers[g.index] = _Batcher(g, cfg.router.max_batch_size if cfg.router.batching else 1,
                                              self._group_failed)
        self.eos_ids = self._eos_from_config() or ({self.tokenizer.eos_token_id} - {None})

    def _eos_from_config(self) -> set[int]:
        from transformers import GenerationConfig

        try:
            gc = GenerationConfig.from_pretrained(resolve_model_path(self.config.model.model,
                                                                     self.config.model.cache_dir))
        except OSError:
            return set()
        eos = gc.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())

    # ----------------------------------------------------------------------------------------- API

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[dict]:
        """Decode one request, yielding chunks ``{token_ids, text, finish_reason?, stats?, usage?}``."""
        if len(prompt_ids) >= self.max_context:
            raise SpecServeError(f"prompt has {len(prompt_ids)} tokens; the context is {self.max_context}",
                                 param="messages")
        limit = self.config.router.max_running_requests + self.config.router.max_waiting_requests
        if len(self.requests) + self.num_waiting >= limit:
            raise Saturated(f"server is saturated ({limit} requests in flight); retry later")
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
        seq_id = request_id or f"req-{next(self._ids)}"
        group = min(self.groups, key=lambda g: sum(r.group is g for r in self.requests.values()))
        worker_index = (next(self._ids) % len(self.workers)) if self.workers else None
        seq = Sequence(prompt_ids, params, self.tokenizer, self.eos_ids, seq_id=seq_id)
        req = _Request(seq, params.model_dump(mode="json"), group, worker_index, t_arrival,
                       make_strategy(self.config.drafter, self.worker_info.get("draft_cost_per_token", 0.0)))
        self.requests[seq_id] = req
        self.metrics.set_queue(len(self.requests), self.num_waiting)
        self.metrics.prompt_tokens(len(prompt_ids))
        try:
            async for chunk in self._decode(req):
                yield chunk
        finally:
            self._release(req)

    def status(self) -> dict:
        """Live counts, for health checks and leak tests."""
        return {"running": len(self.requests), "waiting": self.num_waiting,
                "groups": [{"index": g.index, "generation": g.generation, "ranks": len(g.ranks)} for g in self.groups],
                "draft_workers": len(self.workers), "max_context": self.max_context}

    async def held_sequences(self) -> dict:
        """Sequences held by every worker and rank 0 of every group (all 0 when idle)."""
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        drafts = await asyncio.gather(*[w.num_sequences.remote() for w in self.workers], return_exceptions=True)
        targets = await asyncio.gather(*[g.num_sequences() for g in self.groups], return_exceptions=True)
        return {"router": len(self.requests), "draft_workers": [d if isinstance(d, int) else -1 for d in drafts],
                "target_groups": [t if isinstance(t, int) else -1 for t in targets]}

    async def placement(self) -> dict:
        """Node of every draft worker and target rank."""
        drafts = await asyncio.gather(*[w.info.remote() for w in self.workers])
        return {"draft_workers": drafts, "target_groups": [g.infos for g in self.groups]}

    # ---------------------------------------------------------------------------------- the loop

    async def _decode(self, req: _Request) -> AsyncIterator[dict]:
        seq, group = req.seq, req.group
        cfg = self.config
        if group.index in self.rebuilding:
            await self.rebuilding[group.index]
        generation = group.generation
        try:
            hidden = await group.add(seq.seq_id, seq.prompt_ids, req.params_dict)
        except RayError as e:
            await self._group_failed(group)
            raise TargetFailed(str(e)) from None
        worker = await self._attach(req, hidden)
        needs_features = bool(self.worker_info.get("target_layers"))
        # Overlap pays only when drafting costs something: an n-gram lookup is free, and the extra
        # speculative draft call would only add actor traffic (measured in docs/benchmarks.md).
        pipelining = (cfg.router.pipelining and not needs_features
                      and self.worker_info.get("draft_cost_per_token", 0.0) > 0.0)
        ready = None  # a pipelined block already drafted for the next step: (tokens, probs)
        plain_steps = 0
        while not seq.finished:
            room = min(seq.remaining - 1, self.max_context - len(seq.prompt_ids) - len(seq.output_ids) - 1)
            if room < 0:
                seq.abort("length")
                break
            k = min(req.strategy.next_k(), room)
            tokens, probs = [], None
            t0 = time.perf_counter()
            if k > 0 and ready is not None:
                tokens, probs = ready[0][:k], (ready[1][:k] if ready[1] is not None else None)
                self.pipelined_blocks += 1
            elif k > 0 and worker is not None:
                block = await self._draft(req, worker, seq.all_ids, k)
                if block is None:
                    worker = None
                else:
                    tokens = block.token_ids[:k]
                    probs = block.probs[: len(tokens)] if block.probs is not None else None
            ready = None
            if worker is None and req.worker_index is not None and not needs_features:
                plain_steps += 1
                if plain_steps % REATTACH_EVERY == 0:
                    worker = await self._attach(req, None)
            t1 = time.perf_counter()
            if group.generation != generation or group.index in self.rebuilding:
                raise TargetFailed("target group failed during this request")
            fut = self.batchers[group.index].submit(StepRequest(seq.seq_id, seq.last_id, tokens, probs))
            speculative = None
            if pipelining and worker is not None and tokens and len(tokens) < room:
                # Draft the block after this one, assuming it is fully accepted.
                speculative = worker.step.remote(seq.seq_id, seq.all_ids + tokens, k + 1, None)
            result: StepResult = await fut
            if group.generation != generation:
                raise TargetFailed("target group was rebuilt")
            self._record(req, len(tokens), result, t1 - t0)
            appended = seq.commit(result.verdict.tokens)
            if result.hidden is not None:
                req.pending_hidden.append(result.hidden)
            if speculative is not None and not seq.finished and result.verdict.num_accepted == len(tokens):
                ready = await self._take_pipelined(req, speculative, result.verdict.tokens[-1])
            yield self._chunk(req, appended)

    async def _attach(self, req: _Request, hidden) -> object | None:
        if req.worker_index is None:
            return None
        worker = self.workers[req.worker_index]
        try:
            await worker.start.remote(req.seq.seq_id, req.seq.all_ids, req.params_dict, hidden)
            return worker
        except RayError:
            self.metrics.draft_failure()
            return None

    async def _draft(self, req: _Request, worker, token_ids: list[int], k: int):
        hidden = torch.cat(req.pending_hidden) if req.pending_hidden else None
        try:
            block = await worker.step.remote(req.seq.seq_id, token_ids, k, hidden)
        except RayError:
            log.warning("draft worker failed; %s continues with plain decoding", req.seq.seq_id)
            self.metrics.draft_failure()
            return None
        req.pending_hidden.clear()
        return block

    async def _take_pipelined(self, req: _Request, ref, bonus: int):
        try:
            block = await ref
        except RayError:
            return None
        if len(block.token_ids) >= 2 and block.token_ids[0] == bonus:
            return block.token_ids[1:], (block.probs[1:] if block.probs is not None else None)
        return None

    def _record(self, req: _Request, num_draft: int, result: StepResult, draft_s: float) -> None:
        stats = req.seq.stats
        stats.record(num_draft, result.verdict.num_accepted)
        stats.draft_time_s += draft_s
        stats.verify_time_s += result.verify_time_s
        req.strategy.update(num_draft, result.verdict.num_accepted)
        self.metrics.step(num_draft, result.verdict.num_accepted, draft_s, result.verify_time_s)

    def _chunk(self, req: _Request, appended: list[int]) -> dict:
        seq = req.seq
        now = time.perf_counter()
        if appended:
            if len(seq.output_ids) == len(appended):
                self.metrics.ttft(now - req.t_arrival)
            elif req.t_last_token:
                self.metrics.itl((now - req.t_last_token) / len(appended))
            req.t_last_token = now
        text = seq.text
        hold = 0
        if not seq.finished:
            # Hold back an incomplete UTF-8 character and a possible stop-string prefix.
            hold = max([len(s) - 1 for s in seq.params.stop] + [0])
            while len(text) - hold > req.emitted_chars and text[len(text) - hold - 1 : len(text) - hold] == "\ufffd":
                hold += 1
        end = max(req.emitted_chars, len(text) - hold)
        delta = text[req.emitted_chars : end]
        req.emitted_chars = end
        chunk: dict = {"token_ids": appended, "text": delta}
        if seq.finished:
            chunk["finish_reason"] = "length" if seq.finish_reason == "length" else "stop"
            chunk["stats"] = seq.stats.to_dict()
            chunk["usage"] = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
                              "total_tokens": len(seq.prompt_ids) + len(seq.output_ids)}
            self.metrics.finished(seq.finish_reason or "stop", len(seq.output_ids), now - req.t_arrival)
        return chunk

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
        task = asyncio.get_running_loop().create_task(self._free_remote(req))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _free_remote(self, req: _Request) -> None:
        seq_id = req.seq.seq_id
        if req.worker_index is not None:
            try:
                await self.workers[req.worker_index].finish.remote(seq_id)
            except RayError:
                pass
        try:
            await req.group.free([seq_id])
        except RayError:
            pass

    async def _group_failed(self, group: TargetGroup) -> None:
        """Rebuild a group whose rank died (once, however many requests noticed)."""
        if group.index in self.rebuilding:
            return
        log.error("target group %d failed; rebuilding", group.index)

        async def rebuild():
            try:
                await group.rebuild()
            finally:
                self.rebuilding.pop(group.index, None)

        self.rebuilding[group.index] = asyncio.get_running_loop().create_task(rebuild())

    def shutdown(self) -> None:
        """Stop every actor this router started."""
        for g in self.groups:
            g.shutdown()
        for w in self.workers:
            ray.kill(w, no_restart=True)

"""One suffix cache for an app's replicas: a Ray actor that passes finished outputs between them.

Each replica whose suffix drafter shares its cache (``drafter.suffix_shared_cache``) sends the outputs
its requests finished to the hub and adds the other replicas' to its own cache, about once a second
(:class:`SuffixSync`). The drafter lives in the router on engine hf (:class:`DrafterCache`) and in
vLLM's worker processes on engine vllm (:class:`VllmWorkerCache`: the same two calls through the
worker extension, on every rank, between engine steps). Lookups stay local: a decoding step never waits on the hub, and a hub that is
gone costs the replicas only the sharing, never a request. The hub keeps the newest ``max_outputs``
outputs, so a replica that joins late starts from them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import deque

import ray
from ray.exceptions import RayError

from actors.calls import submit
from specserve.drafters.suffix import SuffixDrafter

log = logging.getLogger("specserve.router")

#: Seconds between a replica's exchanges with the hub.
SYNC_INTERVAL_S = 1.0


def hub_name(model: str) -> str:
    """The hub's name: every replica serving ``model`` in this Ray namespace finds the same actor, and an app
    serving another model never reads outputs of this one."""
    return "specserve-suffix-hub-" + hashlib.sha256(model.encode()).hexdigest()[:12]


@ray.remote(num_cpus=0)
class SuffixHub:
    """A log of finished outputs, (origin replica, tenant, tokens), numbered in arrival order."""

    def __init__(self, max_outputs: int):
        self.max_outputs = max_outputs
        self.outputs: deque[tuple[int, str, str | None, list[int]]] = deque()  # (number, origin, tenant, tokens)
        self.next_number = 0

    def exchange(self, origin: str, after: int, outputs: list[tuple[str | None, list[int]]]
                 ) -> tuple[int, list[tuple[str | None, list[int]]]]:
        """Log ``outputs`` from ``origin``; return the other origins' outputs numbered from ``after`` on
        (the oldest still held when ``after`` has left), and the number to ask from next time."""
        news = [(tenant, tokens) for number, o, tenant, tokens in self.outputs if number >= after and o != origin]
        for tenant, tokens in outputs:
            self.outputs.append((self.next_number, origin, tenant, tokens))
            self.next_number += 1
        while len(self.outputs) > self.max_outputs:
            self.outputs.popleft()
        return self.next_number, news


Outputs = list[tuple[str | None, list[int]]]  # (tenant, tokens) per finished request


class DrafterCache:
    """A suffix drafter in this process (the router's on engine hf) as one side of the shared cache."""

    def __init__(self, drafter: SuffixDrafter):
        drafter.share()
        self.drafter = drafter

    async def take(self) -> Outputs:
        """The outputs finished here since the last call."""
        return self.drafter.take_outbox()

    async def add(self, outputs: Outputs) -> None:
        """Add other replicas' outputs to this drafter's cache (per tenant)."""
        self.drafter.learn_all(outputs)


class VllmWorkerCache:
    """Our suffix drafter inside one vLLM engine's workers as one side of the shared cache: each call runs in
    every worker (``collective_rpc``, between engine steps, so never during a draft); every tensor-parallel
    rank drafts the same requests, so each learns the same outputs and rank 0's outbox speaks for all."""

    def __init__(self, engine):
        self.engine = engine

    async def take(self) -> Outputs:
        ranks = await self.engine.collective_rpc("specserve_suffix_take")
        return [(tenant, list(tokens)) for tenant, tokens in (ranks[0] if ranks else [])]

    async def add(self, outputs: Outputs) -> None:
        await self.engine.collective_rpc("specserve_suffix_learn", args=(outputs,))


class SuffixSync:
    """A replica's side of the shared cache: a background task that trades its drafter's finished outputs
    for the other replicas' every ``interval_s`` seconds (``cache``: :class:`DrafterCache` or
    :class:`VllmWorkerCache`)."""

    def __init__(self, cache: DrafterCache | VllmWorkerCache, name: str, max_outputs: int,
                 interval_s: float = SYNC_INTERVAL_S):
        self.cache = cache
        self.name = name
        self.max_outputs = max_outputs
        self.interval_s = interval_s
        self.origin = uuid.uuid4().hex
        self.after = 0  # the next hub number this replica has not seen
        self.received = 0  # outputs added from other replicas
        self.hub = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Find or create the hub and start trading (call from the router's event loop)."""
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def exchange(self) -> int:
        """One trade now: send what finished here, add what finished elsewhere; returns how many were added."""
        outgoing = await self.cache.take()
        try:
            if self.hub is None:
                self.hub = SuffixHub.options(name=self.name, get_if_exists=True).remote(self.max_outputs)
            self.after, news = await submit(self.hub.exchange, self.origin, self.after, outgoing)
        except RayError as e:  # the hub died with the replica that owned it: the next trade starts a new one
            log.warning("suffix cache hub unreachable (%s); sharing resumes with a new hub", type(e).__name__)
            self.hub, self.after = None, 0
            return 0
        if news:
            await self.cache.add(news)
        self.received += len(news)
        return len(news)

    async def _run(self) -> None:
        while True:
            try:
                await self.exchange()
            except Exception as e:  # an engine going down: its death is reported by the core's health check
                log.debug("suffix cache trade failed: %s", e)
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        """Stop trading (the hub stays for the other replicas)."""
        if self.task is not None:
            self.task.cancel()

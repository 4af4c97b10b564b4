"""The replica core: what a model replica (``deployments.app.SpecServer``) asks of its engine host.

Two cores implement it: ``actors.router.RouterCore`` (engine hf: our router, draft workers and
tensor-parallel target groups) and ``actors.vllm_core.VllmCore`` (engine vllm: one vLLM engine per
target group, our proposer inside it). The HTTP layer sees only this class. The rules both share
live here once: admission (a bounded number of requests in flight, 503 beyond it), the least-loaded
choice of a target group or engine, and when overlapping drafting with verification pays.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from actors.config import ReplicaConfig
from specserve.config import SamplingParams
from specserve.errors import Saturated
from specserve.models import ModelInfo
from specserve.outputs import StreamChunk

T = TypeVar("T")


class ReplicaCore(abc.ABC):
    """Request state and decoding for one model replica, hosted in the SpecServer replica's process."""

    config: ReplicaConfig
    info: ModelInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine(s) and any draft workers; return once a request can be served."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Decode one request, yielding a :class:`StreamChunk` per step; the last one has finish_reason.

        Raises ``SpecServeError`` (bad input), ``Saturated`` (too many requests in flight) or
        ``TargetFailed``. Closing the iterator (a client gone) frees the request everywhere.
        """

    @abc.abstractmethod
    def status(self) -> dict:
        """Live counts, for health checks, operators and leak tests."""

    @abc.abstractmethod
    async def held_sequences(self) -> dict:
        """Requests held by every part of the replica (0 everywhere when idle)."""

    @abc.abstractmethod
    async def placement(self) -> dict:
        """Where the replica's actors run (nodes, pids)."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """False once an engine or a target group is down for good (Serve then replaces the replica)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop engines and draft workers."""

    # ------------------------------------------------------------------------- shared rules

    def admit(self, in_flight: int) -> None:
        """Refuse a new request when ``in_flight`` requests already fill the running and waiting room."""
        limit = self.config.router.max_running_requests + self.config.router.max_waiting_requests
        if in_flight >= limit:
            raise Saturated(f"server is saturated ({limit} requests in flight); retry later")


def least_loaded(choices: Sequence[T], load: Callable[[T], int]) -> T:
    """The choice with the least load (the first of equals): a target group or engine for a new request."""
    return min(choices, key=load)


def pipelining_pays(configured: bool | None, draft_cost_per_token: float) -> bool:
    """Overlap the next draft with verification only when drafting costs something: an n-gram or suffix
    lookup is free, and the extra speculative call would only add traffic (docs/benchmarks.md).
    ``configured`` True or False forces it; None decides by the drafter's cost."""
    return draft_cost_per_token > 0.0 if configured is None else configured

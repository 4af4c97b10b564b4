"""Tensor-parallel target workers: one Ray actor per rank, a group per target replica.

The ranks of a group form a torch.distributed process group (gloo on CPU, nccl with CUDA)
and load the target with transformers' tensor parallelism (``tp_plan="auto"``). Every
rank runs the same verification step in lockstep; all ranks compute the same logits and,
because every request carries a seed chosen by the router, the same verdict, so their
caches stay consistent. Rank 0's result is the one the router uses.
"""

from __future__ import annotations

import asyncio
import os
import socket

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.calls import submit
from cluster.config import ActorResources, TopologyConfig
from cluster.placement import actor_options, torch_threads, tp_bundles
from specserve.config import ModelConfig, SamplingParams
from specserve.errors import TargetFailed
from specserve.target import StepRequest, StepResult, TreeStepRequest, Verifier


@ray.remote(max_restarts=0)
class TargetRank:
    """One rank of a tensor-parallel target group, hosting the core Verifier."""

    def __init__(self, rank: int, world_size: int, master: str, model_cfg: dict, hidden_layers: list[int],
                 backend: str, num_threads: int | None = None):
        torch.set_num_threads(torch_threads(num_threads, sharers=world_size))
        self.rank, self.world_size = rank, world_size
        cfg = ModelConfig.model_validate(model_cfg)
        kwargs: dict = {}
        if world_size > 1:
            addr, port = master.split(":")
            os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world_size),
                              LOCAL_RANK=str(rank if backend == "gloo" else 0))
            torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
            kwargs["tp_plan"] = "auto"
        from specserve.models import load_model

        self.verifier = Verifier(load_model(cfg, **kwargs), hidden_layers=tuple(hidden_layers))

    def info(self) -> dict:
        """Where this rank runs."""
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "num_threads": torch.get_num_threads()}

    def add(self, seq_id: str, prompt_ids: list[int], params: dict) -> torch.Tensor | None:
        """Prefill a new sequence; rank 0 returns the prompt's hidden features if the drafter needs them."""
        hidden = self.verifier.add(seq_id, prompt_ids, SamplingParams.model_validate(params))
        return hidden if self.rank == 0 else None

    def step_batch(self, reqs: list[StepRequest | TreeStepRequest]) -> list[StepResult] | None:
        """Verify a batch of blocks (chains, and draft trees) in one forward pass (all ranks in lockstep)."""
        results = self.verifier.verify(reqs)
        return results if self.rank == 0 else None

    def free(self, seq_ids: list[str]) -> None:
        """Drop finished or aborted sequences."""
        for s in seq_ids:
            self.verifier.free(s)

    def num_sequences(self) -> int:
        """Sequences with a KV cache here (0 when nothing leaks)."""
        return len(self.verifier.states)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TargetGroup:
    """A target replica: its ranks, their placement group, and lockstep calls to them.

    Lives inside the router (not an actor itself). ``rebuild`` replaces every rank after one died.
    """

    def __init__(self, index: int, model_cfg: ModelConfig, topology: TopologyConfig, hidden_layers: tuple[int, ...]):
        self.index = index
        self.model_cfg = model_cfg
        self.topology = topology
        self.hidden_layers = list(hidden_layers)
        self.ranks: list = []
        self.pg = None
        self.lock = asyncio.Lock()  # one verification pass at a time: ranks must see the same call order
        self.generation = 0
        self.closed = False  # set by shutdown: no build may start or finish afterwards

    async def build(self) -> None:
        """Reserve the group's bundles (STRICT_PACK by default) and start its ranks.

        A build cut short (cancelled, a rank that failed to start, or ``shutdown`` meanwhile) leaves
        nothing behind: the bundles it reserved and the ranks it started are released before it raises.
        """
        self._check_open()
        tp = self.topology.tensor_parallel_size
        res: ActorResources = self.topology.target_rank
        pg = self.pg = placement_group(tp_bundles(res, tp), strategy=self.topology.placement_strategy)
        try:
            await pg.ready()
            self._check_open()
            backend = self.topology.backend
            if backend == "auto":
                backend = "nccl" if res.num_gpus > 0 else "gloo"
            # Rank 0's node hosts the rendezvous; the ranks of a STRICT_PACK group share that node.
            master = f"{ray.util.get_node_ip_address()}:{_free_port()}"
            self.ranks = [
                TargetRank.options(
                    **actor_options(res),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
                ).remote(r, tp, master, self.model_cfg.model_dump(mode="json"), self.hidden_layers, backend,
                         res.num_threads)
                for r in range(tp)
            ]
            self.infos = await asyncio.gather(*[submit(r.info) for r in self.ranks])
            self._check_open()
        except BaseException:
            self._release()  # this build's ranks and bundles (already gone if ``shutdown`` came first)
            raise
        self.generation += 1

    async def add(self, seq_id: str, prompt_ids: list[int], params: dict):
        async with self.lock:
            outs = await asyncio.gather(*[submit(r.add, seq_id, prompt_ids, params) for r in self.ranks])
        return outs[0]

    async def step_batch(self, reqs: list[StepRequest | TreeStepRequest]) -> list[StepResult]:
        async with self.lock:
            outs = await asyncio.gather(*[submit(r.step_batch, reqs) for r in self.ranks])
        return outs[0]

    async def free(self, seq_ids: list[str]) -> None:
        if not seq_ids:
            return
        async with self.lock:
            await asyncio.gather(*[submit(r.free, seq_ids) for r in self.ranks], return_exceptions=True)

    async def num_sequences(self) -> int:
        return await submit(self.ranks[0].num_sequences)

    async def rebuild(self) -> None:
        """Kill every rank (one died, the process group is broken) and start a fresh group."""
        self._release()
        await self.build()

    def shutdown(self) -> None:
        """Stop the group for good: its ranks, its bundles, and any build under way (which then raises)."""
        self.closed = True
        self._release()

    def _check_open(self) -> None:
        if self.closed:
            raise TargetFailed(f"target group {self.index} was shut down")

    def _release(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.ranks = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

"""Topology configuration: resources for draft workers and target ranks (Ray-free, pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from specserve.config import DrafterConfig, StrictModel

#: Drafters cheap enough to run inside the router (no model, no torch work): draft_placement 'auto' puts them there.
#: The suffix drafter there also keeps one cross-request cache per replica (draft workers would keep one each).
ROUTER_DRAFTERS = ("ngram", "suffix")


class ActorResources(StrictModel):
    """What one actor asks Ray for. Where it runs follows from these, not from code."""

    num_cpus: float = Field(0.25, ge=0.0, description="CPUs reserved (fractional is fine on small CPU boxes).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved (0 on CPU-only clusters).")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to require, e.g. 'A10G' or 'H100' (None: any)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources to require, e.g. {'draft_node': 0.01} to pin to nodes started "
        "with that resource.",
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024,
        description="torch threads this actor uses on CPU. None: derived where the actor starts (target ranks: "
        "the node's CPUs shared among the ranks of one group; draft workers: 1, since drafting should stay "
        "cheap beside the target). An explicit value wins.",
    )


class TopologyConfig(StrictModel):
    """How many draft workers and target groups, and where they run."""

    num_draft_workers: int = Field(
        1, ge=0, le=256,
        description="Draft worker actors (0: no drafting). Not started when the drafter runs in the router "
        "(see draft_placement).",
    )
    draft_placement: Literal["auto", "router", "workers"] = Field(
        "auto",
        description="Where drafting runs on engine 'hf'. 'workers': on the draft worker actors. 'router': inside "
        "the router process, no actor hop per block (model-free drafters only: 'ngram', 'suffix'). 'auto': 'router' "
        "for 'ngram' and 'suffix' (a lookup costs less than the hop to another actor; suffix keeps one cross-request "
        "cache per replica), 'workers' for drafters with a model.",
    )
    num_target_groups: int = Field(1, ge=1, le=256, description="Target replicas, each a tensor-parallel group.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Ranks (GPUs) per target group.")
    draft_worker: ActorResources = Field(
        default_factory=ActorResources, description="Resources of each draft worker."
    )
    target_rank: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.5),
        description="Resources of each target rank.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK",
        description="Placement group strategy for the ranks of one target group (STRICT_PACK keeps a TP "
        "group on one node, where NVLink/shared memory lives).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend of a TP group: auto = nccl with CUDA, gloo otherwise."
    )

    @model_validator(mode="after")
    def _check(self) -> TopologyConfig:
        if self.backend == "nccl" and self.target_rank.num_gpus == 0:
            raise ValueError("backend 'nccl' needs target_rank.num_gpus > 0; use 'gloo' on CPU")
        return self


def check_draft_placement(drafter: DrafterConfig, topology: TopologyConfig, engine: str = "hf") -> None:
    """Refuse a drafter with a model in the router process (it would stall every request's loop), and a shared
    suffix cache where engine hf's suffix drafter does not draft in the router (engine vllm: ``check_engine_fits``)."""
    if topology.draft_placement == "router" and drafter.kind not in ROUTER_DRAFTERS + ("none",):
        raise ValueError(f"topology.draft_placement 'router' runs only model-free drafters "
                         f"({', '.join(ROUTER_DRAFTERS)}); drafter {drafter.kind!r} needs 'workers' or 'auto'")
    if engine == "hf" and drafter.suffix_shared_cache and (
            drafter.kind != "suffix" or not drafts_in_router(drafter, topology)):
        raise ValueError("drafter.suffix_shared_cache shares the suffix drafter's cache between routers: it needs "
                         "drafter.kind 'suffix' drafting in the router (topology.draft_placement 'auto' or 'router')")


def drafts_in_router(drafter: DrafterConfig, topology: TopologyConfig) -> bool:
    """True when the router drafts itself (no draft workers): see ``TopologyConfig.draft_placement``."""
    if drafter.kind == "none" or drafter.num_speculative_tokens == 0:
        return False
    return topology.draft_placement == "router" or (
        topology.draft_placement == "auto" and drafter.kind in ROUTER_DRAFTERS)

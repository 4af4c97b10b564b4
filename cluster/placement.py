"""Ray resource requests and placement group bundles computed from the topology config."""

from __future__ import annotations

from cluster.config import ActorResources


def actor_options(res: ActorResources) -> dict:
    """``.options(...)`` for an actor with these resources."""
    opts: dict = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    if res.accelerator_type:
        opts["accelerator_type"] = res.accelerator_type
    return opts


def bundle(res: ActorResources) -> dict[str, float]:
    """One placement group bundle that fits one actor with these resources."""
    b: dict[str, float] = {"CPU": res.num_cpus}
    if res.num_gpus:
        b["GPU"] = res.num_gpus
    b.update(res.resources)
    if res.accelerator_type:
        # Ray exposes accelerator types as a node resource; a sliver of it pins the bundle to such nodes.
        b[f"accelerator_type:{res.accelerator_type}"] = 0.001
    return {k: v for k, v in b.items() if v}  or {"CPU": 0.001}


def tp_bundles(res: ActorResources, tp: int) -> list[dict[str, float]]:
    """Bundles of one tensor-parallel group: one per rank."""
    return [bundle(res) for _ in range(tp)]

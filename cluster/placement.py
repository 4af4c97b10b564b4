"""Ray resource requests and placement group bundles computed from the topology config."""

from __future__ import annotations

import os

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


def node_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads(explicit: int | None, sharers: int, cpus: int | None = None) -> int:
    """Threads for an actor: ``explicit`` if set, else the node's CPUs split among ``sharers`` actors.

    ``sharers`` is how many compute-heavy actors of the same kind share the node (the ranks of a
    STRICT_PACK tensor-parallel group); more threads than free cores collapses OpenMP throughput.
    """
    if explicit is not None:
        return explicit
    return max(1, (cpus if cpus is not None else node_cpus()) // max(1, sharers))

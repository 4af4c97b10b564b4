"""Online distillation on Ray Train: the same loop as ``distill``, one data-parallel worker per rank.

``TorchTrainer`` starts ``num_workers`` workers and a torch.distributed process group (gloo on
CPU, nccl on GPU: Ray Train picks the backend from ``use_gpu``). Every worker loads the target
(the teacher), reads every ``num_workers``-th chunk of the stream, and averages gradients with an
all-reduce before each optimiser step, so all ranks keep identical weights. Rank 0 writes the run
files and reports them as a Ray Train checkpoint; a re-run with the same ``out_dir`` (same run
name and storage) resumes from the latest one. The same command scales from two CPU workers on
127.0.0.1 to GPU nodes: ``--workers N --use-gpu --device cuda --storage SHARED_PATH``.
It lives in ``actors/`` because it is Ray's side of training; the loop itself is
``specserve.training.distill``, Ray-free.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from specserve.training.distill import SERVABLE, STATE, DistillConfig, Session, distill


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    """Average gradients over the process group in one flat all-reduce."""
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t, src=0)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build a Session from Ray's context and run the distillation loop."""
    import ray.train

    cfg = DistillConfig.model_validate(config["distill"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.device.startswith("cuda"):
        cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device())})
    checkpoint = ray.train.get_checkpoint()
    resume_dir = cfg.out_dir  # without a Ray Train checkpoint: the run directory's own state, if any
    if checkpoint is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="specserve-resume-"))
        with checkpoint.as_directory() as d:
            shutil.copy(Path(d) / STATE, resume_dir / STATE)
    if rank != 0:  # only rank 0 writes the run directory; the others keep scratch copies
        cfg = cfg.model_copy(update={"out_dir": Path(tempfile.mkdtemp(prefix=f"specserve-rank{rank}-"))})

    def report(step: int, metrics: dict, written: Path | None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if written is None:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name in (STATE, SERVABLE):
                shutil.copy(written / name, Path(tmp) / name)
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    multi = world > 1
    session = Session(rank=rank, world_size=world, all_reduce=_all_reduce_mean if multi else None, report=report,
                      resume_dir=resume_dir, broadcast=_broadcast_from_rank0 if multi else None)
    distill(cfg, session=session, progress=rank == 0)


def run_ray_train(cfg: DistillConfig, *, num_workers: int, use_gpu: bool = False,
                  cpus_per_worker: float | None = None, address: str | None = None,
                  storage: str | None = None) -> dict:
    """Run ``cfg`` on ``num_workers`` Ray Train workers; return the last reported metrics."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            from cluster.local import init_local_ray

            init_local_ray()  # a local Ray of our own, on 127.0.0.1 only
    out = Path(cfg.out_dir).resolve()
    cfg = cfg.model_copy(update={"out_dir": out})
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else max(0.1, float(cfg.threads))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"distill": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=out.name, storage_path=str(Path(storage).resolve()) if storage else str(out / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    return dict(result.metrics or {})

"""Online distillation as a Ray Train TorchTrainer: 2 data-parallel workers (gloo) on a local Ray on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

from actors.train_workers import run_ray_train
from cluster.local import init_local_ray
from specserve.drafters.block import BlockDrafterConfig, read_checkpoint
from specserve.training.distill import LOG, SERVABLE, DistillConfig

pytestmark = pytest.mark.ray

DRAFTER = BlockDrafterConfig(block_size=4, num_layers=1, target_layers=(0, 1), draft_vocab_size=256)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(2400)  # two Ray Train runs; minutes on a machine whose 2 cores other suites share
def test_two_workers_train_checkpoint_and_resume_through_ray_train(ray_cluster, tiny_dir, tmp_path):
    out = tmp_path / "run"
    cfg = DistillConfig(out_dir=out, model=str(tiny_dir), dtype="fp32", drafter=DRAFTER, seq_len=64,
                        batch_sequences=1, anchors_per_sequence=8, steps=4, warmup_steps=1, save_every=2,
                        vocab_conversations=20)
    metrics = run_ray_train(cfg, num_workers=2, cpus_per_worker=0.5)
    assert metrics["step"] == 4
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Both workers' tokens count: each step covers one chunk per worker.
    assert log[0]["tokens_seen"] > 64 and log[-1]["tokens_seen"] > log[0]["tokens_seen"]
    checkpoints = sorted((out / "ray").rglob("state.pt"))
    assert checkpoints, "rank 0 reports its state as a Ray Train checkpoint"
    assert torch.load(checkpoints[-1], weights_only=True)["step"] == 4
    assert read_checkpoint(out / SERVABLE)["meta"]["step"] == 4

    # The same command with more steps resumes from the latest checkpoint.
    metrics = run_ray_train(cfg.model_copy(update={"steps": 6}), num_workers=2, cpus_per_worker=0.5)
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert metrics["step"] == 6 and read_checkpoint(out / SERVABLE)["meta"]["step"] == 6

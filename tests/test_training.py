"""Drafter training on a tiny target: feature cache, a step that lowers the loss, resumption, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from specserve.cli import main
from specserve.config import DrafterConfig
from specserve.drafters import make_drafter
from specserve.drafters.block import BlockDrafter, BlockDrafterConfig, build_model
from specserve.training.config import DataConfig, LossConfig, TrainConfig
from specserve.training.data import load_sequences, prepare, target_features
from specserve.training.train import FINAL, LOG, compute_loss, make_batch, make_optimizer, train

LAYERS = (0, 1)
CONVERSATIONS = [
    (i, [{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
    for i, (text, answer) in enumerate([
        ("Count to ten.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
        ("Write a haiku about rain.", "Soft rain on the roof / the garden drinks slowly / the night smells of earth"),
        ("What is 2 + 2?", "2 + 2 is 4."),
        ("Name three colours.", "Red, green and blue."),
    ])
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_target):
    cfg = DataConfig(num_conversations=4, max_response_tokens=12, generate_batch_size=2, shard_size=3)
    return prepare(tmp_path_factory.mktemp("cache"), cfg, LAYERS, tiny_target, iter(CONVERSATIONS))


def test_cache_holds_regenerated_responses_and_verifier_features(cache_dir, tiny_target):
    seqs = load_sequences(cache_dir)
    assert len(seqs) == 4
    assert len(list(cache_dir.glob("shard-*.pt"))) == 2  # 3 + 1 sequences
    for s in seqs:
        assert s.features.shape == (len(s.ids), 2 * tiny_target.model.config.hidden_size)
        prompt = s.ids[: s.response_start].tolist()
        with torch.inference_mode():  # the response is the target's own greedy continuation
            out = tiny_target.model.generate(torch.tensor([prompt]), max_new_tokens=len(s.ids) - len(prompt),
                                             do_sample=False, pad_token_id=0)
        assert out[0].tolist() == s.ids.tolist()
    # Features are those of an unpadded forward pass, as the verifier computes them (bf16 storage).
    alone = target_features(tiny_target, LAYERS, [seqs[0].ids.tolist()])[0]
    assert torch.allclose(alone.float(), seqs[0].features.float(), atol=0.05, rtol=0.02)


def test_batches_see_only_context_before_their_anchor(cache_dir):
    seqs = load_sequences(cache_dir)
    batch = make_batch(seqs[:2], 4, 5, torch.Generator().manual_seed(0))
    for b, s in enumerate(seqs[:2]):
        for m in range(5):
            a = int(batch.anchor_pos[b, m])
            if not batch.valid[b, m].any():
                continue
            assert a >= s.response_start - 1
            assert batch.anchor_ids[b, m] == s.ids[a]
            assert batch.ctx_mask[b, m].sum() == a and batch.ctx_mask[b, m, :a].all()
            n_valid = int(batch.valid[b, m].sum())
            assert batch.targets[b, m, :n_valid].tolist() == s.ids[a + 1:a + 1 + n_valid].tolist()


def test_a_training_step_lowers_the_loss(cache_dir, tiny_target):
    torch.manual_seed(0)
    seqs = load_sequences(cache_dir)
    cfg = TrainConfig(lr=3e-3)
    model = build_model(BlockDrafterConfig(block_size=4, target_layers=LAYERS), tiny_target, dtype=torch.float32)
    opt = make_optimizer(model, cfg)
    batch = make_batch(seqs, 4, 8, torch.Generator().manual_seed(0))
    losses = LossConfig()  # all terms on
    before, _ = compute_loss(model, batch, losses)
    opt.zero_grad()
    before.backward()
    opt.step()
    after, _ = compute_loss(model, batch, losses)
    assert after.item() < before.item()


def test_training_resumes_where_it_stopped_and_writes_a_servable_checkpoint(cache_dir, tiny_target, tmp_path):
    seqs = load_sequences(cache_dir)
    base = {"drafter": {"block_size": 4, "target_layers": list(LAYERS)}, "batch_sequences": 2,
            "anchors_per_sequence": 4, "save_every": 2, "warmup_steps": 1}
    straight = TrainConfig(out_dir=tmp_path / "a", steps=4, **base)
    train(straight, tiny_target, seqs, progress=False)
    first = TrainConfig(out_dir=tmp_path / "b", steps=2, **base)
    train(first, tiny_target, seqs, progress=False)
    resumed = train(TrainConfig(out_dir=tmp_path / "b", steps=4, **base), tiny_target, seqs, progress=False)
    assert resumed["steps"] == 4
    log = [json.loads(line) for line in (tmp_path / "b" / LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    straight_log = [json.loads(line) for line in (tmp_path / "a" / LOG).read_text().splitlines()]
    assert log[-1]["loss"] == pytest.approx(straight_log[-1]["loss"], rel=1e-4)
    drafter = make_drafter(DrafterConfig(kind="block", path=str(tmp_path / "b" / FINAL)), tiny_target)
    assert isinstance(drafter, BlockDrafter) and drafter.block_size == 4


@pytest.mark.parametrize("flags,needle", [
    (["--block-size", "0"], "block_size"),
    (["--losses", "ce=1,focal=0.3"], "unknown loss 'focal'"),
    (["--target-layers", "1,x"], "comma-separated integers"),
])
def test_bad_training_flags_exit_2_with_one_line(flags, needle, capsys, tmp_path):
    assert main(["train-drafter", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0

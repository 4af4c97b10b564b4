"""Online distillation on a tiny target: the stream, the teacher's labels, a run that learns and resumes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from specserve.cli import main
from specserve.config import DrafterConfig
from specserve.drafters import make_drafter
from specserve.drafters.block import BlockDrafter, BlockDrafterConfig, build_model
from specserve.training.curve import plot_curve
from specserve.training.distill import LOG, SERVABLE, STATE, VOCAB, DistillConfig, distill, teach
from specserve.training.stream import chunk_stream, draft_vocabulary, templated_turns

DRAFTER = BlockDrafterConfig(block_size=4, num_layers=1, target_layers=(0, 1), draft_vocab_size=300)


def conversations(n: int = 400):
    """Synthetic chats whose answers are predictable from the question (a drafter can learn them)."""
    for i in range(n):
        start = i % 50
        yield i, [{"role": "user", "content": f"Count from {start}."},
                  {"role": "assistant", "content": " ".join(str(start + j) for j in range(30))},
                  {"role": "user", "content": "Again."},
                  {"role": "assistant", "content": " ".join(str(start + j) for j in range(20))}]


def test_templated_turns_mark_exactly_the_assistant_turns(tokenizer):
    turns = next(conversations())[1]
    ids, mask = templated_turns(tokenizer, turns, 10_000)
    assert ids == list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))
    assistant_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    user_text = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "0 1 2 3" in assistant_text and "Count from" not in assistant_text
    assert "Count from 0." in user_text and "Again." in user_text and "0 1 2 3" not in user_text


def test_ranks_split_the_chunk_stream_without_overlap_and_resume_by_position(tokenizer):
    every = list(chunk_stream(tokenizer, conversations(20), 32))
    r0 = list(chunk_stream(tokenizer, conversations(20), 32, rank=0, world_size=2))
    r1 = list(chunk_stream(tokenizer, conversations(20), 32, rank=1, world_size=2))
    key = lambda c: (c.conversation, tuple(c.ids))  # noqa: E731
    assert sorted(map(key, r0 + r1)) == sorted(map(key, every)) and not set(map(key, r0)) & set(map(key, r1))
    assert all(len(c.ids) <= 32 and sum(c.assistant[1:]) >= 16 for c in every)
    later = list(chunk_stream(tokenizer, conversations(20), 32, start=5))
    assert later == [c for c in every if c.conversation >= 5]


def test_draft_vocabulary_keeps_the_most_frequent_tokens_and_the_forced_ones():
    counts = Counter({5: 10, 7: 9, 3: 8, 11: 1})
    vocab = draft_vocabulary(counts, 3, vocab_size=20, always=[2])
    assert vocab.tolist() == [2, 5, 7]
    assert draft_vocabulary(counts, 6, vocab_size=20).tolist() == [0, 1, 3, 5, 7, 11]


def test_teacher_labels_are_the_targets_next_token_distribution(tokenizer, tiny_target):
    torch.manual_seed(0)
    model = build_model(DRAFTER, tiny_target, dtype=torch.float32)
    model.set_draft_vocab(torch.arange(100, 400))
    chunks = list(chunk_stream(tokenizer, conversations(3), 48))[:2]
    batch = teach(tiny_target, model, chunks, 5, torch.Generator().manual_seed(0))
    k = DRAFTER.block_size
    for b, chunk in enumerate(chunks):
        logits = tiny_target.model(torch.tensor([chunk.ids])).logits[0].float()  # [L, vocab]
        for m in range(5):
            a = int(batch.anchor_pos[b, m])
            assert chunk.assistant[a + 1] and batch.anchor_ids[b, m] == chunk.ids[a]
            assert bool(batch.ctx_mask[b, m, :a].all()) and not bool(batch.ctx_mask[b, m, a:].any())
            for i in range(k):
                row = b * 5 + m
                if a + i + 1 >= len(chunk.ids):
                    assert not batch.valid[row, i]
                    continue
                p = torch.softmax(logits[a + i], -1)[100:400]
                torch.testing.assert_close(batch.soft[row, i], p / p.sum(), atol=1e-5, rtol=1e-4)
                best = int(logits[a + i].argmax())
                assert int(batch.targets[row, i]) == (best - 100 if 100 <= best < 400 else -1)
    layers = tiny_target.model(torch.tensor([chunks[0].ids]), output_hidden_states=True).hidden_states
    want = torch.cat([layers[1][0], layers[2][0]], -1)  # outputs of target layers 0 and 1
    torch.testing.assert_close(batch.features[0, : len(chunks[0].ids)], want, atol=1e-4, rtol=1e-4)


def test_distillation_learns_resumes_and_writes_a_servable_checkpoint(tiny_target, tmp_path):
    cfg = DistillConfig(out_dir=tmp_path / "run", model="unused", dtype="fp32", drafter=DRAFTER, seq_len=64,
                        batch_sequences=2, anchors_per_sequence=16, steps=40, warmup_steps=5, lr=3e-3,
                        save_every=10, vocab_conversations=50)
    distill(cfg, target=tiny_target, conversations_fn=conversations, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = sum(r["ce"] for r in log[:5]) / 5, sum(r["ce"] for r in log[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert log[-1]["tokens_seen"] > log[0]["tokens_seen"] > 0
    vocab = json.loads((tmp_path / "run" / VOCAB).read_text())
    assert vocab["coverage"] == 1.0 and len(vocab["ids"]) == 300  # synthetic text uses < 300 tokens
    # Extend the run: it resumes at step 40 from state.pt and continues the stream where it stopped.
    state = torch.load(tmp_path / "run" / STATE, weights_only=True)
    distill(cfg.model_copy(update={"steps": 45}), target=tiny_target, conversations_fn=conversations,
            progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [r["step"] for r in log[40:]] == [41, 42, 43, 44, 45]
    assert log[40]["next_conversation"] > state["next_conversation"]
    drafter = make_drafter(DrafterConfig(kind="block", path=str(tmp_path / "run" / SERVABLE)), tiny_target)
    assert isinstance(drafter, BlockDrafter) and drafter.model.logits_dim == 300
    assert torch.equal(drafter.model.draft_vocab, torch.tensor(vocab["ids"]))
    png = plot_curve(tmp_path / "run", tmp_path / "curve.png")
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("flags,needle", [
    (["--draft-vocab", "1"], "draft_vocab_size"),
    (["--workers", "-1"], "--workers"),
    (["--losses", "bogus=1"], "unknown loss"),
    (["--seq-len", "4"], "seq_len"),
])
def test_bad_distill_flags_exit_2_with_one_line(flags, needle, capsys, tmp_path):
    assert main(["distill-drafter", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err

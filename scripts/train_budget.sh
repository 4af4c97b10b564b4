#!/usr/bin/env bash
# Budget of online distillation on this machine: teacher (target prefill) tokens/s, drafter training
# predictions/s and one drafting pass, for the full and a trimmed draft vocabulary. One thread, niced.
# Usage: scripts/train_budget.sh [THREADS] [all|train|draft]   (JSON lines on stdout; docs/drafter-training.md)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${2:-all}
if [[ $stage == all || $stage == train ]]; then
nice -n 10 "${PY:-.venv/bin/python}" - "${1:-1}" <<'PY'
import json, sys, time
import torch
from specserve.config import ModelConfig, SamplingParams
from specserve.drafters.block import BlockDrafter, BlockDrafterConfig, build_model
from specserve.training.distill import Chunk, teach
from specserve.training.losses import block_losses
from specserve.training.config import LossConfig
from specserve.models import load_model

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
def timed(fn, reps=3):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps

for dtype in ("fp32", "bf16"):
    target = load_model(ModelConfig(dtype=dtype))
    chunks = [Chunk(0, torch.randint(100, 40000, (512,)).tolist(), [True] * 512) for _ in range(4)]
    for vocab in (None, 8192):
        model = build_model(BlockDrafterConfig(draft_vocab_size=vocab), target, dtype=torch.float32).train()
        gen = torch.Generator().manual_seed(0)
        t_teach = timed(lambda: teach(target, model, chunks, 64, gen), reps=1)
        batch = teach(target, model, chunks, 64, gen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def train_step():
            logits = model(batch.features, batch.anchor_ids, batch.anchor_pos, batch.ctx_mask)
            loss, _ = block_losses(logits.flatten(0, 1), batch.targets, batch.valid, LossConfig(), soft=batch.soft)
            opt.zero_grad()
            loss.backward()
            opt.step()
        t_train = timed(train_step, reps=2)
        serve = BlockDrafter(build_model(BlockDrafterConfig(draft_vocab_size=vocab), target).eval())
        ids = torch.randint(100, 40000, (201,)).tolist()
        feats = torch.randn(200, 5 * 576, dtype=target.dtype)
        serve.start("s", ids, SamplingParams(), feats)
        t_draft = timed(lambda: serve.propose("s", ids, 8), reps=20)
        t_step = timed(lambda: target.model(torch.tensor([ids[:1]])), reps=10)
        print(json.dumps({"target_dtype": dtype, "draft_vocab": vocab or 49152,
                          "teacher_tokens_per_s": round(4 * 512 / t_teach, 1),
                          "train_predictions_per_s": round(int(batch.valid.sum()) / t_train, 1),
                          "draft_pass_ms": round(t_draft * 1e3, 2), "target_1token_ms": round(t_step * 1e3, 2)}),
              flush=True)
PY
fi
if [[ $stage == all || $stage == draft ]]; then
# One drafting pass, full vs trimmed vocabulary, interleaved in one process so machine load hits both alike.
nice -n 10 "${PY:-.venv/bin/python}" - "${1:-1}" <<'PY'
import json, sys, time
import torch
from specserve.config import ModelConfig, SamplingParams
from specserve.drafters.block import BlockDrafter, BlockDrafterConfig, build_model
from specserve.models import load_model

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
for dtype in ("fp32", "bf16"):
    target = load_model(ModelConfig(dtype=dtype))
    drafters = {v: BlockDrafter(build_model(BlockDrafterConfig(draft_vocab_size=v), target).eval()) for v in (None, 8192)}
    ids = torch.randint(100, 40000, (201,)).tolist()
    feats = torch.randn(200, 5 * 576, dtype=target.dtype)
    for d in drafters.values():
        d.start("s", ids, SamplingParams(), feats)
        d.propose("s", ids, 8)
    times = {v: [] for v in drafters}
    for _ in range(15):
        for v, d in drafters.items():
            t0 = time.perf_counter()
            d.propose("s", ids, 8)
            times[v].append(time.perf_counter() - t0)
    med = {v: sorted(t)[len(t) // 2] * 1e3 for v, t in times.items()}
    print(json.dumps({"dtype": dtype, "draft_pass_ms_full": round(med[None], 2), "draft_pass_ms_8192": round(med[8192], 2),
                      "ratio": round(med[None] / med[8192], 2)}), flush=True)
PY
fi

"""The training loop: random anchors in cached sequences, one block per anchor, AdamW, resumable.

Each step takes ``batch_sequences`` sequences and ``anchors_per_sequence`` anchor positions in
each one's response (the anchor is the last committed token; the first anchor possible is the
prompt's last token). Block m sees the target features of positions < its anchor and its own
K positions; its targets are the K tokens after the anchor. Batches depend only on
(seed, step), so a resumed run draws the same batches an uninterrupted run would have.

``out_dir`` holds ``state.pt`` (weights, optimiser, step; written atomically every
``save_every`` steps), ``log.jsonl`` (one JSON object per step) and, at the end,
``drafter.pt`` (the servable checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import ModelConfig
from specserve.drafters.block import BlockDrafterModel, build_model, save_checkpoint
from specserve.errors import SpecServeError
from specserve.models import LoadedModel, load_model
from specserve.training.config import LossConfig, TrainConfig
from specserve.training.data import Sequence, load_sequences, prepare
from specserve.training.losses import block_losses

STATE = "state.pt"
LOG = "log.jsonl"
FINAL = "drafter.pt"


@dataclass
class Batch:
    """Blocks to train on, M per sequence."""

    features: torch.Tensor  # [B, L, F] target features (zero padded)
    anchor_ids: torch.Tensor  # [B, M]
    anchor_pos: torch.Tensor  # [B, M]
    ctx_mask: torch.Tensor  # [B, M, L] context positions each block sees (< its anchor)
    targets: torch.Tensor  # [B, M, K] the K tokens after each anchor
    valid: torch.Tensor  # [B, M, K] False past the sequence end and for padding blocks


def make_batch(seqs: list[Sequence], block_size: int, anchors: int, gen: torch.Generator) -> Batch:
    """Sample ``anchors`` anchor positions in each sequence's response and build their blocks."""
    b, k, length = len(seqs), block_size, max(len(s.ids) for s in seqs)
    feat_dim = seqs[0].features.shape[1]
    features = torch.zeros(b, length, feat_dim, dtype=seqs[0].features.dtype)
    anchor_ids = torch.zeros(b, anchors, dtype=torch.long)
    anchor_pos = torch.zeros(b, anchors, dtype=torch.long)
    targets = torch.zeros(b, anchors, k, dtype=torch.long)
    valid = torch.zeros(b, anchors, k, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        features[i, :n] = s.features
        first = max(s.response_start - 1, 0)  # the prompt's last token drafts the first response token
        candidates = torch.arange(first, n - 1)  # an anchor needs at least one token after it
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:anchors]]
        m = len(pick)
        anchor_pos[i, :m] = pick
        anchor_ids[i, :m] = s.ids[pick]
        offsets = pick[:, None] + 1 + torch.arange(k)  # [m, K]
        ok = offsets < n
        targets[i, :m] = torch.where(ok, s.ids[offsets.clamp(max=n - 1)], 0)
        valid[i, :m] = ok
    ctx_mask = torch.arange(length)[None, None] < anchor_pos[..., None]  # [B, M, L]
    return Batch(features, anchor_ids, anchor_pos, ctx_mask, targets, valid)


def compute_loss(model: BlockDrafterModel, batch: Batch, losses: LossConfig) -> tuple[torch.Tensor, dict]:
    """Total loss and logged terms of one batch."""
    logits = model(batch.features, batch.anchor_ids, batch.anchor_pos, batch.ctx_mask)  # [B, M, K, vocab]
    k = logits.shape[2]
    return block_losses(logits.flatten(0, 1), batch.targets.view(-1, k), batch.valid.view(-1, k), losses)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to 10% of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: BlockDrafterModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the drafter's own parameters (the shared target weights are not among them)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, target: LoadedModel | None = None, sequences: list[Sequence] | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) a drafter per ``cfg``; write ``drafter.pt``; return the run summary."""
    torch.set_num_threads(cfg.threads)
    if target is None:
        target = load_model(ModelConfig(model=cfg.data.model, dtype=cfg.data.dtype))
    if sequences is None:
        prepare(cfg.data_dir, cfg.data, cfg.drafter.target_layers, target)
        sequences = load_sequences(cfg.data_dir)
    if not sequences:
        raise SpecServeError("no training sequences: raise --num-conversations", param="num_conversations")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.drafter, target, dtype=torch.float32).train()
    opt = make_optimizer(model, cfg)
    step = _resume(out, cfg, model, opt)
    log_f = open(out / LOG, "a", encoding="utf-8")
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    t0, tokens, last = time.perf_counter(), 0, {}
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(sequences), (cfg.batch_sequences,), generator=gen).tolist()
        batch = make_batch([sequences[i] for i in idx], model.cfg.block_size, cfg.anchors_per_sequence, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, terms = compute_loss(model, batch, cfg.losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += int(batch.valid.sum())
        elapsed = time.perf_counter() - t0
        last = {"step": step, "loss": float(loss.detach()), **terms, "grad_norm": float(grad_norm),
                "lr": opt.param_groups[0]["lr"], "tokens_per_s": tokens / elapsed, "time": time.time()}
        log_f.write(json.dumps(last) + "\n")
        log_f.flush()
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc_len=f"{terms['accepted_length']:.2f}",
                        tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update()
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(out, cfg, model, opt, step)
    bar.close()
    log_f.close()
    meta = {"train": cfg.model_dump(mode="json"), "steps": step, "final": last,
            "num_sequences": len(sequences)}
    save_checkpoint(out / FINAL, model, target, meta)
    return meta


def _save_state(out: Path, cfg: TrainConfig, model: BlockDrafterModel, opt: torch.optim.Optimizer,
                step: int) -> None:
    tmp = out / (STATE + ".tmp")
    torch.save({"config": cfg.model_dump(mode="json"), "step": step, "model": model.state_dict(),
                "optimizer": opt.state_dict()}, tmp)
    tmp.replace(out / STATE)


def _resume(out: Path, cfg: TrainConfig, model: BlockDrafterModel, opt: torch.optim.Optimizer) -> int:
    """Load ``state.pt`` if present (same config required); trim the log to the resumed step."""
    path = out / STATE
    if not path.exists():
        (out / LOG).unlink(missing_ok=True)
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    # A run may be extended (more steps) or moved (another out_dir); anything else is another run.
    free = ("steps", "save_every", "out_dir")
    saved = {k: v for k, v in state["config"].items() if k not in free}
    current = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in free}
    if saved != current:
        raise SpecServeError(f"{out} holds a run with another config: pass another --out or delete {path}",
                             param="out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    step = int(state["step"])
    log = out / LOG
    if log.exists():
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))
    return step

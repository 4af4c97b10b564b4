"""Online distillation of a block drafter: the target labels every training step, no regeneration.

Each step takes ``batch_sequences`` chunks of ShareGPT train-split conversations (all turns, chat
template; ``specserve.training.stream``) and runs the frozen target over them once (one prefill, no
generation). That pass yields both the drafter's inputs (hidden states of ``target_layers``) and its
labels: at block position i of a block anchored at a, the label is the target's next-token
distribution at position a + i, i.e. what the target predicts after the text, restricted to the
draft vocabulary (soft labels; their argmax is what greedy verification accepts). The loss presets
of ``specserve.training.losses`` apply on top of these labels.

The same loop runs in one process (``distill``) and as a Ray Train worker function
(``actors.train_workers``): a ``Session`` supplies the rank, gradient averaging and
checkpointing. The run directory holds ``state.pt`` (weights, optimiser, step, stream position),
``drafter.pt`` (the servable bf16 checkpoint, rewritten with every save), ``log.jsonl`` (one JSON
object per step) and ``vocab.json`` (the draft vocabulary and its coverage).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm import tqdm

from specserve.config import DEFAULT_MODEL, ModelConfig, StrictModel
from specserve.drafters.block import (
    BlockDrafterConfig,
    BlockDrafterModel,
    build_model,
    load_model_from_checkpoint,
    save_checkpoint,
)
from specserve.errors import SpecServeError
from specserve.models import LoadedModel, load_model
from specserve.training.config import LossConfig
from specserve.training.losses import block_losses
from specserve.training.stream import Chunk, chunk_stream, coverage, draft_vocabulary, token_frequencies

STATE = "state.pt"
LOG = "log.jsonl"
SERVABLE = "drafter.pt"
VOCAB = "vocab.json"


def _default_drafter() -> BlockDrafterConfig:
    return BlockDrafterConfig(draft_vocab_size=8192)


class DistillConfig(StrictModel):
    """One online distillation run of a block drafter."""

    out_dir: Path = Field(Path("out/distill"), description="Run directory: state.pt, drafter.pt, log.jsonl, "
                          "vocab.json. Re-running with the same directory resumes.")
    model: str = Field(DEFAULT_MODEL, description="Target model (the teacher, frozen).")
    dtype: str = Field("bf16", description="Target dtype for features and labels: 'bf16' matches serving; "
                       "'fp32' is several times faster on CPUs without native bf16 (AVX2 only).")
    device: str = Field("cpu", description="torch device of the target and the drafter ('cuda' on GPU workers).")
    drafter: BlockDrafterConfig = Field(default_factory=_default_drafter, description="Drafter shape.")
    losses: LossConfig = Field(default_factory=LossConfig, description="Loss terms and weights.")
    init_from: Path | None = Field(None, description="Servable checkpoint to start from when the run directory "
                                   "holds no state (a warm restart: weights only, fresh optimiser).")
    seq_len: int = Field(512, ge=16, description="Tokens per training chunk (one target pass covers a chunk).")
    max_chunks: int = Field(4, ge=1, description="Chunks taken from one conversation at most (diversity).")
    batch_sequences: int = Field(4, ge=1, description="Chunks per step (per worker).")
    anchors_per_sequence: int = Field(32, ge=1, description="Blocks per chunk per step, at random positions "
                                      "whose next token is an assistant token.")
    steps: int = Field(1000, ge=1, description="Optimiser steps to reach (raise it to extend a run).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (linear warmup, then constant: a "
                      "long run is extended by raising steps, with no schedule to restart).")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps (also after a warm restart).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and anchor sampling.")
    save_every: int = Field(50, ge=1, description="Steps between saves of state.pt and drafter.pt.")
    vocab_conversations: int = Field(500, ge=1, description="Train conversations counted to pick the draft "
                                     "vocabulary (its most frequent tokens).")
    threads: int = Field(1, ge=1, description="torch threads per process (the machine is shared).")


@dataclass
class Session:
    """What the loop needs from its runner: rank, gradient averaging, checkpoint I/O.

    The single-process runner uses the defaults (rank 0 of 1, files in ``out_dir``); Ray Train
    supplies its own (``actors.train_workers``).
    """

    rank: int = 0
    world_size: int = 1
    #: Average gradients over workers (in place); None: a single worker.
    all_reduce: Callable[[list[torch.Tensor]], None] | None = None
    #: Called after each save with (step, metrics, run files written by rank 0, or None on other ranks).
    report: Callable[[int, dict, Path | None], None] | None = None
    #: A directory holding a state.pt to resume from, if any (Ray Train's checkpoint); else out_dir.
    resume_dir: Path | None = None
    #: Copy rank 0's tensors to every rank (in place) after loading; None: a single worker.
    broadcast: Callable[[list[torch.Tensor]], None] | None = None


@dataclass
class DistillBatch:
    """One step's inputs and labels."""

    features: torch.Tensor  # [B, L, F] target features (drafter dtype)
    anchor_ids: torch.Tensor  # [B, M]
    anchor_pos: torch.Tensor  # [B, M]
    ctx_mask: torch.Tensor  # [B, M, L] positions before each anchor
    soft: torch.Tensor  # [B * M, K, draft vocab] target distribution restricted to the draft vocabulary
    targets: torch.Tensor  # [B * M, K] target argmax as a draft-vocabulary index (-1: outside it)
    valid: torch.Tensor  # [B * M, K] False past the chunk end and for padding blocks
    num_tokens: int  # target tokens in the batch (the teacher's work)


def pick_anchors(chunks: list[Chunk], anchors: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor positions [B, M] (and a mask [B, M] of real ones): tokens followed by an assistant token."""
    pos = torch.zeros(len(chunks), anchors, dtype=torch.long)
    real = torch.zeros(len(chunks), anchors, dtype=torch.bool)
    for i, c in enumerate(chunks):
        candidates = torch.tensor([a for a in range(1, len(c.ids) - 1) if c.assistant[a + 1]], dtype=torch.long)
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:anchors]]
        pos[i, : len(pick)] = pick
        real[i, : len(pick)] = True
    return pos, real


@torch.no_grad()  # not inference_mode: the features and labels feed autograd
def teach(target: LoadedModel, model: BlockDrafterModel, chunks: list[Chunk], anchors: int,
          gen: torch.Generator) -> DistillBatch:
    """One target pass over ``chunks``: the drafter's features and the soft labels of random blocks."""
    cfg = model.cfg
    k = cfg.block_size
    b, length = len(chunks), max(len(c.ids) for c in chunks)
    device = target.device
    ids = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
        mask[i, : len(c.ids)] = 1
    out = target.model.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    # hidden_states[0] is the embedding output; layer j's output is hidden_states[j + 1] (as the Verifier).
    features = torch.cat([out.hidden_states[j + 1] for j in cfg.target_layers], dim=-1)  # [B, L, F]
    anchor_pos, real = pick_anchors(chunks, anchors, gen)
    anchor_pos, real = anchor_pos.to(device), real.to(device)
    lens = mask.sum(1).to(device)  # [B]
    label_pos = anchor_pos[..., None] + torch.arange(k, device=device)  # [B, M, K] position predicting a+i+1
    valid = real[..., None] & (label_pos + 1 < lens[:, None, None])  # [B, M, K] the predicted token exists
    label_pos = label_pos.clamp(max=length - 1)
    last = out.last_hidden_state  # [B, L, hidden] (after the final norm)
    rows = torch.gather(last, 1, label_pos.flatten(1)[..., None].expand(-1, -1, last.shape[-1]))  # [B, M*K, h]
    logp = F.log_softmax(target.model.lm_head(rows).float(), dim=-1)  # [B, M*K, vocab]
    best = logp.argmax(-1)  # [B, M*K] the target's greedy choice
    if model.draft_vocab is not None:
        vocab = model.draft_vocab.to(device)
        soft = logp.index_select(-1, vocab).exp()  # [B, M*K, draft vocab]
        index = torch.full((model.target_vocab_size,), -1, dtype=torch.long, device=device)
        index[vocab] = torch.arange(len(vocab), device=device)
        best = index[best]
    else:
        soft = logp.exp()
    soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-12)
    anchor_ids = torch.gather(ids.to(device), 1, anchor_pos)  # [B, M]
    ctx_mask = torch.arange(length, device=device)[None, None] < anchor_pos[..., None]  # [B, M, L]
    dtype = model.fc.weight.dtype
    return DistillBatch(
        features=features.to(dtype), anchor_ids=anchor_ids, anchor_pos=anchor_pos, ctx_mask=ctx_mask,
        soft=soft.view(b * anchors, k, -1).to(dtype), targets=best.view(b * anchors, k),
        valid=valid.view(b * anchors, k), num_tokens=int(mask.sum()),
    )


def lr_at(step: int, cfg: DistillConfig, start: int = 0) -> float:
    """Linear warmup from ``start`` (a run's first or resumed step), then constant."""
    done = step - start
    return cfg.lr * min(1.0, (done + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def _conversations(target: LoadedModel) -> Iterable[tuple[int, list[dict]]]:
    from specserve.data import sharegpt_conversations

    return sharegpt_conversations("train")


def choose_vocabulary(cfg: DistillConfig, target: LoadedModel, conversations_fn) -> tuple[torch.Tensor, dict]:
    """The draft vocabulary from token counts of the first ``vocab_conversations`` conversations."""
    counts = token_frequencies(target.tokenizer, conversations_fn(), cfg.vocab_conversations)
    size = cfg.drafter.draft_vocab_size
    vocab = draft_vocabulary(counts, size, target.model.config.vocab_size, sorted(target.eos_token_ids))
    info = {"size": size, "conversations": cfg.vocab_conversations, "tokens_counted": sum(counts.values()),
            "distinct_tokens": len(counts), "coverage": round(coverage(counts, vocab), 5), "ids": vocab.tolist()}
    return vocab, info


def distill(cfg: DistillConfig, *, target: LoadedModel | None = None, session: Session | None = None,
            conversations_fn=None, progress: bool = True) -> dict:
    """Train (or resume) a drafter by online distillation per ``cfg``; return the last step's log."""
    session = session or Session()
    torch.set_num_threads(cfg.threads)
    conversations_fn = conversations_fn or (lambda: _conversations(target))
    if target is None:
        target = load_model(ModelConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device))
    for p in target.model.parameters():
        p.requires_grad_(False)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.drafter, target, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, tokens_seen, next_conv = 0, 0, 0
    resume = session.resume_dir or out
    if (resume / STATE).exists():
        state = torch.load(resume / STATE, map_location="cpu", weights_only=True)
        if state["config"]["drafter"] != cfg.drafter.model_dump(mode="json"):
            raise SpecServeError(f"{resume / STATE} holds a drafter of another shape: pass another --out",
                                 param="out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens_seen, next_conv = int(state["step"]), int(state["tokens_seen"]), int(state["next_conversation"])
    elif cfg.init_from is not None:
        warm = load_model_from_checkpoint(cfg.init_from, target)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in warm.state_dict().items()})
        meta = torch.load(cfg.init_from, map_location="cpu", weights_only=True).get("meta", {})
        tokens_seen, next_conv = int(meta.get("tokens_seen", 0)), int(meta.get("next_conversation", 0))
    elif model.draft_vocab is not None:
        saved = json.loads((out / VOCAB).read_text()) if (out / VOCAB).exists() else {}
        if saved.get("size") == cfg.drafter.draft_vocab_size:  # a restarted run keeps its vocabulary
            vocab = torch.tensor(saved["ids"])
        else:
            vocab, info = choose_vocabulary(cfg, target, conversations_fn)
            if session.rank == 0:
                (out / VOCAB).write_text(json.dumps(info))
        model.set_draft_vocab(vocab.to(model.draft_vocab.device))
    model.to(cfg.device)
    if session.broadcast is not None:  # every rank starts from rank 0's weights, step and stream position
        progress_t = torch.tensor([step, tokens_seen, next_conv], dtype=torch.long, device=cfg.device)
        session.broadcast([*model.state_dict().values(), progress_t])
        step, tokens_seen, next_conv = (int(x) for x in progress_t)
    start_step = step
    stream = chunk_stream(target.tokenizer, conversations_fn(), cfg.seq_len, max_chunks=cfg.max_chunks,
                          start=next_conv, rank=session.rank, world_size=session.world_size)
    if session.rank == 0 and (out / LOG).exists():  # steps logged after the last save are redone
        kept = [line for line in (out / LOG).read_text().splitlines() if line and json.loads(line)["step"] <= step]
        (out / LOG).write_text("".join(line + "\n" for line in kept))
    log_f = open(out / LOG, "a", encoding="utf-8") if session.rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step", disable=not progress or session.rank)
    t0, tokens_here, predicted_here, teach_s, train_s, last = time.perf_counter(), 0, 0, 0.0, 0.0, {}
    while step < cfg.steps:
        chunks = [c for _, c in zip(range(cfg.batch_sequences), stream, strict=False)]
        if not chunks:
            break  # the data ran out
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + session.rank)
        ta = time.perf_counter()
        batch = teach(target, model, chunks, cfg.anchors_per_sequence, gen)
        tb = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, start_step)
        logits = model(batch.features, batch.anchor_ids, batch.anchor_pos, batch.ctx_mask)  # [B, M, K, V']
        loss, terms = block_losses(logits.flatten(0, 1), batch.targets, batch.valid, cfg.losses, soft=batch.soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if session.all_reduce is not None:
            session.all_reduce([p.grad for p in model.parameters() if p.grad is not None])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tc = time.perf_counter()
        teach_s, train_s = teach_s + tb - ta, train_s + tc - tb
        step += 1
        n_tok = batch.num_tokens * session.world_size
        tokens_seen += n_tok
        tokens_here += n_tok
        predicted_here += int(batch.valid.sum()) * session.world_size
        next_conv = chunks[-1].conversation + 1
        elapsed = time.perf_counter() - t0
        labels = batch.valid.sum().clamp_min(1)
        in_vocab = float(((batch.targets >= 0) & batch.valid).sum() / labels)
        last = {"step": step, "tokens_seen": tokens_seen, "loss": float(loss.detach()), **terms,
                "labels_in_draft_vocab": in_vocab,
                "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": tokens_here / elapsed, "teacher_tokens_per_s": tokens_here / teach_s,
                "predicted_per_s": predicted_here / train_s,
                "next_conversation": next_conv, "time": time.time()}
        if log_f:
            log_f.write(json.dumps(last) + "\n")
            log_f.flush()
        bar.set_postfix(loss=f"{last['loss']:.3f}", greedy=f"{terms['greedy_accepted']:.2f}",
                        tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update()
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save(out, cfg, model, opt, target, step, tokens_seen, next_conv, session, last)
    bar.close()
    if log_f:
        log_f.close()
    return last


def _save(out: Path, cfg: DistillConfig, model: BlockDrafterModel, opt: torch.optim.Optimizer,
          target: LoadedModel, step: int, tokens_seen: int, next_conv: int, session: Session, metrics: dict) -> None:
    """Rank 0 writes state.pt and the servable drafter.pt atomically; every rank reports."""
    written = None
    if session.rank == 0:
        state = {"config": cfg.model_dump(mode="json"), "step": step, "tokens_seen": tokens_seen,
                 "next_conversation": next_conv, "model": model.state_dict(), "optimizer": opt.state_dict()}
        tmp = out / (STATE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(out / STATE)
        meta = {"step": step, "tokens_seen": tokens_seen, "next_conversation": next_conv,
                "distill": cfg.model_dump(mode="json"), "last": metrics}
        save_checkpoint(out / SERVABLE, model, target, meta)
        written = out
    if session.report is not None:
        session.report(step, metrics, written)

"""Training sequences for a block drafter and the cache of the target's hidden states.

A sequence is one ShareGPT (train split) first user turn through the chat template,
followed by a response: ShareGPT's own, or (``regenerate``) the target's greedy response,
which is what verification will accept at serving time. For every token the target's
features at the drafter's ``target_layers`` are computed once, in the serving dtype, with
the same convention the verifier uses (output of layer j = ``hidden_states[j + 1]``), and
stored in shards: ``shard-00000.pt`` holds ``shard_size`` sequences. A shard is written
atomically, so an interrupted preparation resumes at the first missing shard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import ModelConfig
from specserve.drafters.block import target_fingerprint
from specserve.errors import SpecServeError
from specserve.models import LoadedModel, load_model
from specserve.training.config import DataConfig

MANIFEST = "data.json"


@dataclass
class Example:
    """One training sequence (before features)."""

    source: int  # ShareGPT conversation index
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class Sequence:
    """A cached training sequence: tokens, target features, where the response starts."""

    ids: torch.Tensor  # [L] int64
    features: torch.Tensor  # [L, len(target_layers) * hidden] bf16
    response_start: int


def chat_examples(tokenizer, conversations: Iterator[tuple[int, list[dict]]], cfg: DataConfig) -> list[Example]:
    """First exchanges of ``conversations`` as (prompt ids, ShareGPT response ids), chat template applied."""
    out = []
    for index, turns in conversations:
        if len(out) == cfg.num_conversations:
            break
        user = turns[:1]
        prompt = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        if len(prompt) > cfg.max_prompt_tokens:
            continue
        response: list[int] = []
        if len(turns) > 1 and turns[1]["role"] == "assistant":
            full = list(tokenizer.apply_chat_template(turns[:2], tokenize=True, return_dict=False))
            if full[: len(prompt)] == prompt:
                response = full[len(prompt):][: cfg.max_response_tokens]
        if cfg.regenerate or len(response) >= 2:
            out.append(Example(index, prompt, response))
    return out


@torch.inference_mode()
def regenerate(target: LoadedModel, examples: list[Example], cfg: DataConfig) -> None:
    """Replace each example's response with the target's greedy response (batched, left-padded)."""
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = sorted(target.eos_token_ids)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))  # similar lengths together
    for start in range(0, len(order), cfg.generate_batch_size):
        batch = [examples[i] for i in order[start:start + cfg.generate_batch_size]]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e.prompt_ids)) + e.prompt_ids for e in batch])  # [B, W]
        mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in batch])
        out = target.model.generate(ids.to(target.device), attention_mask=mask.to(target.device),
                                    max_new_tokens=cfg.max_response_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad)
        for e, row in zip(batch, out[:, width:].tolist(), strict=True):
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            e.response_ids = row[:cut]


@torch.inference_mode()
def target_features(target: LoadedModel, layers: tuple[int, ...], sequences: list[list[int]]) -> list[torch.Tensor]:
    """Features [len(seq), len(layers) * hidden] of each sequence (right-padded batch, causal: exact)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=target.device)  # [B, W]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=target.device)
    out = target.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    feats = torch.cat([out.hidden_states[j + 1] for j in layers], dim=-1)  # [B, W, F]
    return [feats[i, : len(s)].to(torch.bfloat16).cpu() for i, s in enumerate(sequences)]


def manifest(cfg: DataConfig, layers: tuple[int, ...], target: LoadedModel) -> dict:
    """What a cache was built from; a cache built from anything else is not reused."""
    return {"data": cfg.model_dump(mode="json"), "target_layers": list(layers),
            "target": target_fingerprint(target.model)}


def prepare(data_dir: Path, cfg: DataConfig, layers: tuple[int, ...], target: LoadedModel | None = None,
            conversations: Iterator[tuple[int, list[dict]]] | None = None) -> Path:
    """Build (or finish building) the feature cache in ``data_dir``; return it.

    ``conversations`` defaults to the ShareGPT train split; tests pass their own.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if target is None:
        target = load_model(ModelConfig(model=cfg.model, dtype=cfg.dtype))
    man = manifest(cfg, layers, target)
    man_path = data_dir / MANIFEST
    if man_path.exists():
        old = json.loads(man_path.read_text())
        if {k: old.get(k) for k in man} != man:
            raise SpecServeError(f"{data_dir} holds a cache built with another data config, target or "
                                 "target_layers: pass another --data-dir", param="data_dir")
        if old.get("complete"):
            return data_dir
    man_path.write_text(json.dumps(man, indent=1))
    if conversations is None:
        from specserve.data import sharegpt_conversations

        conversations = sharegpt_conversations("train")
    examples = chat_examples(target.tokenizer, conversations, cfg)
    shards = range(0, len(examples), cfg.shard_size)
    t0, n_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(examples), desc="prepare", unit="seq")
    for shard, start in enumerate(shards):
        path = data_dir / f"shard-{shard:05d}.pt"
        chunk = examples[start:start + cfg.shard_size]
        bar.update(len(chunk))
        if path.exists():
            continue
        if cfg.regenerate:
            regenerate(target, chunk, cfg)
        chunk = [e for e in chunk if len(e.response_ids) >= 2]
        records = []
        for i in range(0, len(chunk), cfg.generate_batch_size):
            batch = chunk[i:i + cfg.generate_batch_size]
            seqs = [e.prompt_ids + e.response_ids for e in batch]
            for e, s, f in zip(batch, seqs, target_features(target, layers, seqs), strict=True):
                records.append({"source": e.source, "ids": torch.tensor(s, dtype=torch.int32), "features": f,
                                "response_start": len(e.prompt_ids)})
                n_tokens += len(s)
        tmp = path.with_suffix(".tmp")
        torch.save(records, tmp)
        tmp.replace(path)
        bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s")
    bar.close()
    man["complete"] = True
    man["num_sequences"] = sum(len(torch.load(p, weights_only=True)) for p in sorted(data_dir.glob("shard-*.pt")))
    man_path.write_text(json.dumps(man, indent=1))
    return data_dir


def load_sequences(data_dir: Path) -> list[Sequence]:
    """Every cached sequence of a complete cache, in shard order."""
    data_dir = Path(data_dir)
    man_path = data_dir / MANIFEST
    if not man_path.exists() or not json.loads(man_path.read_text()).get("complete"):
        raise SpecServeError(f"{data_dir} is not a complete feature cache: run `specserve train-drafter` "
                             "(it prepares the cache first)", param="data_dir")
    out = []
    for path in sorted(data_dir.glob("shard-*.pt")):
        for r in torch.load(path, weights_only=True):
            out.append(Sequence(r["ids"].long(), r["features"], int(r["response_start"])))
    return out

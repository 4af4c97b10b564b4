"""Block drafter checkpoints: the drafter's own weights, its config and the identity of its target.

A checkpoint (``torch.save``, loadable with ``weights_only``) holds format/version, the resolved
``BlockDrafterConfig``, the drafter's weights (floating tensors in bf16, the draft vocabulary as
int64), training metadata and a fingerprint of the target; loading one for another target is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from specserve.config import user_error_from
from specserve.drafters.block.net import BlockDrafterConfig, BlockDrafterModel, build_model
from specserve.errors import SpecServeError
from specserve.models import LoadedModel

CHECKPOINT_FORMAT = "specserve-block-drafter"
#: Version 2 added the optional draft vocabulary; version 1 files (full vocabulary) still load.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: The shipped drafter for the embedded default model (SmolLM2-135M-Instruct).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "drafters" / "smollm2-135m-block.pt"


def drafter_config(data: dict) -> BlockDrafterConfig:
    """Validate a block drafter config dict; a bad field becomes one SpecServeError naming it."""
    try:
        return BlockDrafterConfig.model_validate(data)
    except ValidationError as e:
        raise user_error_from(e) from None


def target_fingerprint(model: nn.Module) -> dict:
    """Identity of a target: its shape and a signature of its token embedding.

    Row sums of 16 evenly spaced embedding rows in fp32 are the same whether the target is
    loaded in bf16 or fp32, and differ for any other trained (or random) embedding.
    """
    c = model.config
    w = model.get_input_embeddings().weight.detach()
    rows = w[:: max(1, w.shape[0] // 16)][:16].float()
    return {
        "model_type": getattr(c, "model_type", ""),
        "vocab_size": int(c.vocab_size),
        "hidden_size": int(c.hidden_size),
        "num_hidden_layers": int(c.num_hidden_layers),
        "embedding_signature": [round(float(s), 4) for s in rows.sum(dim=1)],
    }


def check_fingerprint(saved: dict, target: LoadedModel, where: str) -> None:
    """Refuse a checkpoint trained for another target, saying what differs."""
    current = target_fingerprint(target.model)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if saved.get(key) != current[key]:
            raise SpecServeError(
                f"block drafter {where} was trained for another target ({key} {saved.get(key)} vs "
                f"{current[key]} in {target.path}): train one for this model with `specserve train-drafter`",
                param="drafter",
            )
    a, b = saved.get("embedding_signature", []), current["embedding_signature"]
    if len(a) != len(b) or any(not math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-2) for x, y in zip(a, b, strict=True)):
        raise SpecServeError(
            f"block drafter {where} was trained for another target (token embeddings differ from "
            f"{target.path}): train one for this model with `specserve train-drafter`",
            param="drafter",
        )


def save_checkpoint(path: Path, model: BlockDrafterModel, target: LoadedModel, meta: dict | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the drafter's weights (in ``dtype``), config and target fingerprint to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.cfg.model_dump(mode="json"),
        "target": target_fingerprint(target.model),
        "state_dict": {k: v.to(dtype) if v.is_floating_point() else v
                       for k, v in model.draft_state_dict().items()},
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: Path) -> dict:
    """The raw checkpoint dict, after checking that it is a block drafter checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise SpecServeError(f"block drafter checkpoint not found: {path}", param="drafter")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise SpecServeError(f"cannot read block drafter checkpoint {path}: {e}", param="drafter") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SpecServeError(f"{path} is not a specserve block drafter checkpoint", param="drafter")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise SpecServeError(f"{path} has checkpoint version {ckpt.get('version')}; this specserve reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}", param="drafter")
    return ckpt


def load_model_from_checkpoint(path: Path, target: LoadedModel) -> BlockDrafterModel:
    """The drafter network of a checkpoint, bound to ``target`` (refused if trained for another target)."""
    ckpt = read_checkpoint(path)
    check_fingerprint(ckpt["target"], target, str(path))
    model = build_model(drafter_config(ckpt["config"]), target, init=False)
    model.load_state_dict({k: v.to(target.dtype) if v.is_floating_point() else v
                           for k, v in ckpt["state_dict"].items()})
    return model.eval()


def default_checkpoint() -> Path | None:
    """The shipped block drafter for the embedded default model, or None when it is not installed."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None

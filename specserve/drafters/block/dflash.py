"""Export a block drafter to the DFlash checkpoint format vLLM serves (``speculative_config`` method ``dflash``).

The directory holds ``config.json`` (a Qwen3-shaped ``DFlashDraftModel`` with a ``dflash_config``),
``model.safetensors`` (our weights under vLLM's names) and ``mask_embedding.pt`` (our learned mask
embedding, which vLLM substitutes for the embedding of ``mask_token_id``). vLLM takes the token
embedding from the target; it takes the LM head from the target too unless the checkpoint has one, so a
trimmed draft vocabulary ships its rows of the target's head plus ``d2t`` (draft index -> target id offset).

What maps exactly: the context fusion (``fc`` + ``ctx_norm`` -> ``fc`` + ``hidden_norm``), the per-layer
context keys/values (vLLM projects the fused context with each layer's own k/v projections, as we do),
the attention, MLP and norms, RoPE (rotate-half = vLLM's neox style, same positions), the mask embedding
and the draft vocabulary. What may differ is listed by :func:`dflash_differences`; a drafter built with
``qk_norm=True, last_context_input=False, mask_rows=True`` and no tap on the target's last layer has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.drafters.block.ckpt import load_model_from_checkpoint
from specserve.drafters.block.net import BlockDrafterModel
from specserve.errors import SpecServeError
from specserve.models import LoadedModel

#: The architecture name vLLM's model registry maps to its DFlash drafter.
DFLASH_ARCHITECTURE = "DFlashDraftModel"
MASK_EMBEDDING_FILE = "mask_embedding.pt"
WEIGHTS_FILE = "model.safetensors"

#: Our per-layer parameter names -> vLLM's (checkpoint names, before vLLM stacks q/k/v and gate/up).
_LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "post_attention_layernorm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class DFlashExport:
    """What :func:`export_dflash` wrote and how to serve it."""

    out_dir: Path
    #: The k that makes vLLM's query block [anchor, k masks] the drafter's own block.
    num_speculative_tokens: int
    mask_token_id: int
    #: Where vLLM's forward differs from the drafter's (empty: the export is exact).
    differences: tuple[str, ...]


def dflash_differences(model: BlockDrafterModel, num_target_layers: int) -> tuple[str, ...]:
    """Why vLLM's DFlash forward of ``model``'s export would differ from ``model``'s, one sentence each."""
    cfg = model.cfg
    out = []
    if not cfg.qk_norm:
        out.append("vLLM's DFlash layers apply a per-head RMSNorm to queries and keys before RoPE (Qwen3); this "
                   "drafter has none, so the export carries unit q_norm/k_norm weights and its attention scores "
                   "differ (train with qk_norm=True for an exact export)")
    if cfg.last_context_input:
        out.append("this drafter adds the newest fused context feature to every block input; DFlash has no such "
                   "input, so vLLM's block inputs lack it (train with last_context_input=False)")
    if not cfg.mask_rows:
        out.append(f"vLLM drafts from the k mask rows after the anchor (mask row i predicts the token at its own "
                   f"position); this drafter's row i predicts the token after its position and row 0 (the "
                   f"anchor's) is its first draft, so with k = {cfg.block_size - 1} vLLM's query block is the "
                   f"drafter's block but draft i comes from row i + 1, trained to predict position i + 2: every "
                   f"draft is one position late (train with mask_rows=True)")
    last = num_target_layers - 1
    if last in cfg.target_layers:
        out.append(f"target layer {last} is the target's last: specserve feeds its output after the target's final "
                   f"norm (transformers' hidden_states[-1]), vLLM's auxiliary hidden state is the one before it "
                   f"(pick target_layers below {last} for an exact export)")
    return tuple(out)


def pick_mask_token_id(model: BlockDrafterModel, target: LoadedModel) -> int:
    """A target id to stand for the mask: vLLM embeds every query token equal to it with the mask embedding.

    The target emitting it as a real token would get that embedding in the drafter's block, so take the first
    id that is not a named special token (BOS/EOS/PAD/UNK, chat markers) and that the drafter never drafts
    (outside a trimmed draft vocabulary: rarely generated); with the full vocabulary, the last such id.
    """
    tok, conf = target.tokenizer, target.model.config
    named = {getattr(conf, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    named |= set(tok.all_special_ids) | {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    vocab = model.target_vocab_size
    drafted = set(model.draft_vocab.tolist()) if model.draft_vocab is not None else set()
    candidates = (i for i in (range(vocab) if drafted else range(vocab - 1, -1, -1))
                  if i not in named and i not in drafted)
    return next(candidates)


def dflash_state_dict(model: BlockDrafterModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The drafter's weights under the names vLLM's DFlash loader reads (``d2t`` stays int64)."""
    d = model.cfg.hidden_size // model.cfg.num_heads
    out = {"fc.weight": model.fc.weight, "hidden_norm.weight": model.ctx_norm.weight, "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        for ours, theirs in _LAYER_NAMES.items():
            module = getattr(layer, ours)
            # vLLM always builds q_norm/k_norm; unit weights are the closest a drafter without them gets.
            weight = torch.ones(d) if module is None else module.weight
            out[f"layers.{i}.{theirs}.weight"] = weight
    if model.draft_vocab is not None:
        # vLLM maps draft index i to target id i + d2t[i]; its own head must then hold those rows.
        out["lm_head.weight"] = model.head_weight()
        out["d2t"] = model.draft_vocab - torch.arange(len(model.draft_vocab), device=model.draft_vocab.device)
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in out.items()}


def dflash_config(model: BlockDrafterModel, target: LoadedModel, mask_token_id: int) -> dict:
    """``config.json`` of the export: Qwen3 layer fields, the draft vocabulary and the DFlash fields vLLM reads."""
    cfg, tc = model.cfg, target.model.config
    return {
        "architectures": [DFLASH_ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": tc.max_position_embeddings,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": model.target_vocab_size,
        "draft_vocab_size": model.logits_dim,
        "num_target_layers": tc.num_hidden_layers,
        "target_hidden_size": tc.hidden_size,
        "block_size": cfg.block_size + cfg.mask_rows,
        "dflash_config": {
            # 0-based target layers whose outputs feed fc (vLLM adds 1: its aux ids count the embedding).
            "target_layer_ids": list(cfg.target_layers),
            "mask_token_id": mask_token_id,
            "use_aux_hidden_state": True,
            # The block attends to itself in both directions.
            "causal": False,
        },
        "dtype": "float32",
    }


def export_dflash(drafter: Path | str | BlockDrafterModel, target_dir: Path | str | LoadedModel, out_dir: Path | str,
                  *, mask_token_id: int | None = None) -> DFlashExport:
    """Write ``drafter`` (a checkpoint path or a loaded drafter) to ``out_dir`` as a vLLM DFlash drafter.

    ``target_dir`` is the target's safetensors directory (vLLM serves that one; a checkpoint is checked
    against it) or an already loaded target. ``mask_token_id``: None picks one (:func:`pick_mask_token_id`).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpecServeError(f"{out} exists and is not a directory", param="out")
    target = target_dir if isinstance(target_dir, LoadedModel) else _load_target(Path(target_dir))
    if isinstance(drafter, BlockDrafterModel):
        model = drafter
    else:
        model = load_model_from_checkpoint(Path(drafter), target)
    vocab = model.target_vocab_size
    if mask_token_id is None:
        mask_token_id = pick_mask_token_id(model, target)
    elif not 0 <= mask_token_id < vocab:
        raise SpecServeError(f"mask_token_id {mask_token_id} is outside the target's vocabulary (0..{vocab - 1})",
                             param="mask_token_id")
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(dflash_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    torch.save({"mask_token_id": mask_token_id, "embedding": model.mask_embedding.detach().cpu().float()},
               out / MASK_EMBEDDING_FILE)
    (out / "config.json").write_text(json.dumps(dflash_config(model, target, mask_token_id), indent=2) + "\n")
    return DFlashExport(out, model.cfg.block_size - (not model.cfg.mask_rows), mask_token_id,
                        dflash_differences(model, target.model.config.num_hidden_layers))


def _load_target(path: Path) -> LoadedModel:
    from specserve.config import ModelConfig
    from specserve.models import load_model

    if not (path / "config.json").is_file():
        raise SpecServeError(f"target {path} is not an HF model directory (no config.json): pass the safetensors "
                             "directory vLLM serves", param="model")
    return load_model(ModelConfig(model=str(path), dtype="fp32"))

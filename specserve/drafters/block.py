"""A block drafter in the style of DFlash (arXiv 2602.06036): one forward pass drafts a whole block.

The drafter is a few transformer layers that sit beside the target and reuse its frozen
token embedding and LM head. Its inputs are

* **context features**: hidden states of several target layers for every committed token but
  the newest (exactly what the verifier returns), concatenated and fused by one linear
  projection + RMSNorm into ``c_t`` [hidden]. Every draft layer projects ``c`` with its own
  k/v projections and prepends it to its keys and values, so each layer reads the target's view
  of the context;
* **the block**: the newest committed token (the anchor) followed by ``block_size - 1`` mask
  embeddings, at positions ``n .. n + block_size - 1``.

Attention inside the block is bidirectional; the block sees all of its context. Output row i
(after the final norm and the target's LM head) predicts the token ``i + 1`` places after the
anchor, so one pass yields ``block_size`` draft tokens.

With temperature > 0 each position is sampled independently from its own distribution
``q_i = logits_to_probs(logits_i)``; ``q_i`` does not depend on the earlier draft tokens, so it
is the exact conditional distribution the acceptance test needs and sampling stays lossless.

Checkpoints hold only the drafter's own weights, its config and a fingerprint of the target it
was trained for; loading one for another target is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator
from torch import nn

from specserve.config import (
    MAX_SPECULATIVE_TOKENS,
    DrafterConfig,
    SamplingParams,
    StrictModel,
    user_error_from,
)
from specserve.drafters.base import DraftBlock, Drafter
from specserve.errors import SpecServeError
from specserve.models import LoadedModel
from specserve.sampling import logits_to_probs, make_generator

CHECKPOINT_FORMAT = "specserve-block-drafter"
CHECKPOINT_VERSION = 1
#: The shipped drafter for the embedded default model (SmolLM2-135M-Instruct).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "drafters" / "smollm2-135m-block.pt"
#: Measured in bf16: one drafting pass (1 layer + the LM head over the block) costs ~0.15-0.2 of a target step.
DRAFT_PASS_COST = 0.2


class BlockDrafterConfig(StrictModel):
    """Shape of a block drafter. Width, heads and RoPE follow the target unless set."""

    block_size: int = Field(
        8, ge=1, le=MAX_SPECULATIVE_TOKENS,
        description="Draft tokens predicted per forward pass (the anchor plus block_size - 1 masks in, "
        "block_size tokens out). The drafter proposes at most this many tokens per step.",
    )
    num_layers: int = Field(1, ge=1, le=16, description="Draft transformer layers (1-3 is the CPU sweet spot).")
    target_layers: tuple[int, ...] = Field(
        (1, 8, 15, 22, 29), min_length=1, max_length=16,
        description="0-based target layers whose output hidden states feed the drafter, fused by one "
        "projection. The default spreads five taps over SmolLM2's 30 layers, as DFlash does.",
    )
    hidden_size: int | None = Field(None, ge=8, description="Width; must equal the target's (shared "
                                    "embedding and LM head). None: the target's.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads. None: the target's.")
    num_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (GQA). None: the target's.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width. None: the target's.")
    rms_norm_eps: float | None = Field(None, gt=0, description="RMSNorm epsilon. None: the target's.")
    rope_theta: float | None = Field(None, gt=0, description="RoPE base. None: the target's.")
    init_from_target: bool = Field(
        False, description="Initialise the draft layers from the target's last layers (same shapes) instead "
        "of at random. Off by default: on SmolLM2 it trained no faster in a 25-step comparison.",
    )

    @field_validator("target_layers")
    @classmethod
    def _layers_distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(j < 0 for j in v) or len(set(v)) != len(v):
            raise ValueError(f"target_layers must be distinct non-negative layer indices, got {list(v)}")
        return v

    def resolved(self, target_config) -> BlockDrafterConfig:
        """This config with every None filled from the target's HF config, checked against it."""
        n_layers = target_config.num_hidden_layers
        bad = [j for j in self.target_layers if j >= n_layers]
        if bad:
            raise SpecServeError(
                f"target_layers {bad} do not exist: the target has {n_layers} layers (0..{n_layers - 1})",
                param="target_layers",
            )
        hidden = target_config.hidden_size
        if self.hidden_size not in (None, hidden):
            raise SpecServeError(f"hidden_size {self.hidden_size} must equal the target's ({hidden}): the "
                                 "drafter shares its embedding and LM head", param="hidden_size")
        rope = getattr(target_config, "rope_parameters", None) or {}
        fill = {
            "hidden_size": hidden,
            "num_heads": target_config.num_attention_heads,
            "num_kv_heads": getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
            "intermediate_size": target_config.intermediate_size,
            "rms_norm_eps": target_config.rms_norm_eps,
            "rope_theta": rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
        }
        cfg = self.model_copy(update={k: v for k, v in fill.items() if getattr(self, k) is None})
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise SpecServeError(f"hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads} and num_kv_heads "
                                 f"{cfg.num_kv_heads} must divide evenly", param="num_heads")
        return cfg


def drafter_config(data: dict) -> BlockDrafterConfig:
    """Validate a block drafter config dict; a bad field becomes one SpecServeError naming it."""
    try:
        return BlockDrafterConfig.model_validate(data)
    except ValidationError as e:
        raise user_error_from(e) from None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, H, T, d] at ``positions`` [B, T] (Llama's rotate-half form)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, d]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * emb.cos() + rotated.float() * emb.sin()).to(x.dtype)


class DraftLayer(nn.Module):
    """A Llama decoder layer whose keys and values are [context features; block]."""

    def __init__(self, cfg: BlockDrafterConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(1, 2)  # [B, n, T, d]

    def kv(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        """Keys (rotated) and values [B, kv_heads, T, d] of already-normed inputs ``x`` [B, T, hidden]."""
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), positions, inv_freq)
        return k, self._heads(self.v_proj(x), self.num_kv_heads)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                mask: torch.Tensor | None, inv_freq: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] block states; ctx_k/ctx_v: [B, kv_heads, L, d]; mask: [B, 1, T, L + T] or None."""
        h = self.input_layernorm(x)
        q = apply_rope(self._heads(self.q_proj(h), self.num_heads), positions, inv_freq)  # [B, H, T, d]
        k, v = self.kv(h, positions, inv_freq)
        k, v = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)  # [B, kvH, L + T, d]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, T, d]
        x = x + self.o_proj(attn.transpose(1, 2).flatten(2))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class BlockDrafterModel(nn.Module):
    """The drafter network. The target's embedding and LM head are used, never owned or saved."""

    def __init__(self, cfg: BlockDrafterConfig, embed: nn.Module, lm_head: nn.Module):
        super().__init__()
        assert cfg.hidden_size is not None, "resolve the config against the target first"
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layers) * h, h, bias=False)
        self.ctx_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.randn(h) * 0.02)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        # The tied LM head has large rows: a unit-scale output gives CE ~20-30 at step 0. A small output
        # scale starts near the uniform distribution (CE ~ log vocab) and trains several times faster.
        nn.init.constant_(self.norm.weight, 0.1)
        d = h // cfg.num_heads
        # RoPE frequencies stay fp32 (a plain attribute: ``.to(bfloat16)`` must not round them).
        self._inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
        # A tuple is not registered as a submodule: the shared target weights stay out of
        # parameters() (frozen, never in the optimizer) and out of state_dict() (never saved).
        self._shared = (embed, lm_head)

    def init_from_target(self, target_model: nn.Module) -> None:
        """Copy the target's last ``num_layers`` decoder layers (and final norm) into the draft layers."""
        src_layers = target_model.model.layers[-len(self.layers):]
        with torch.no_grad():
            for dst, src in zip(self.layers, src_layers, strict=True):
                src_params = dict(src.named_parameters())
                for name, p in dst.named_parameters():
                    key = name.replace("q_proj", "self_attn.q_proj").replace("k_proj", "self_attn.k_proj")
                    key = key.replace("v_proj", "self_attn.v_proj").replace("o_proj", "self_attn.o_proj")
                    key = key.replace("gate_proj", "mlp.gate_proj").replace("up_proj", "mlp.up_proj")
                    key = key.replace("down_proj", "mlp.down_proj")
                    p.copy_(src_params[key].to(p.dtype))
            self.norm.weight.copy_(target_model.model.norm.weight.to(self.norm.weight.dtype))

    @property
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2] in fp32 on the drafter's device."""
        if self._inv_freq.device != self.fc.weight.device:
            self._inv_freq = self._inv_freq.to(self.fc.weight.device)
        return self._inv_freq

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Fused context features c [..., hidden] of concatenated target features [..., F]."""
        return self.ctx_norm(self.fc(features.to(self.fc.weight.dtype)))

    def context_kv(self, c: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, keys and values [B, kv_heads, L, d] of fused features ``c`` [B, L, hidden]."""
        return [layer.kv(c, positions, self.inv_freq) for layer in self.layers]

    def block_hidden(self, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]], last_c: torch.Tensor,
                     anchor_ids: torch.Tensor, anchor_pos: torch.Tensor,
                     ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, M, K, hidden] of M blocks per row.

        last_c: [B, M, hidden] fused feature of the position just before each anchor (zeros if none),
            added to every block input: a direct path to the newest context, which the layers would
            otherwise have to learn to find by attention (EAGLE feeds the same feature this way).
        anchor_ids, anchor_pos: [B, M] the anchor token of each block and its position.
        ctx_mask: [B, M, L] which context positions each block may see (None: all of them, M = 1).
        """
        embed = self._shared[0]
        b, m = anchor_ids.shape
        k = self.cfg.block_size
        x = self.mask_embedding.to(self.fc.weight.dtype).expand(b, m, k, -1).clone()  # [B, M, K, hidden]
        x[:, :, 0] = embed(anchor_ids).to(x.dtype)
        x = x + last_c.to(x.dtype)[:, :, None]
        x = x.view(b, m * k, -1)  # [B, T = M * K, hidden]
        positions = (anchor_pos[..., None] + torch.arange(k, device=anchor_pos.device)).view(b, m * k)  # [B, T]
        mask = None
        if ctx_mask is not None or m > 1:
            # Query block i sees its allowed context and every position of its own block.
            length = ctx_kv[0][0].shape[2]
            if ctx_mask is None:
                ctx_mask = torch.ones(b, m, length, dtype=torch.bool, device=x.device)
            same_block = torch.eye(m, dtype=torch.bool, device=x.device).repeat_interleave(k, 0)  # [T, M]
            same_block = same_block.repeat_interleave(k, 1)  # [T, T]
            ctx = ctx_mask.repeat_interleave(k, dim=1)  # [B, T, L]
            mask = torch.cat([ctx, same_block.expand(b, -1, -1)], dim=-1)[:, None]  # [B, 1, T, L + T]
        for layer, (ck, cv) in zip(self.layers, ctx_kv, strict=True):
            x = layer(x, positions, ck, cv, mask, self.inv_freq)
        return self.norm(x).view(b, m, k, -1)

    @property
    def logits_dim(self) -> int:
        """Vocabulary size of the shared LM head."""
        return self._shared[1].weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [..., vocab] (fp32) from the target's LM head."""
        head = self._shared[1]
        return head(hidden.to(head.weight.dtype)).float()

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """The drafter's own weights (nothing of the target's)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}


def build_model(cfg: BlockDrafterConfig, target: LoadedModel, *, init: bool = True,
                dtype: torch.dtype | None = None) -> BlockDrafterModel:
    """A drafter for ``target`` in ``dtype`` (default: the target's); ``init`` applies ``init_from_target``."""
    cfg = cfg.resolved(target.model.config)
    model = BlockDrafterModel(cfg, target.model.get_input_embeddings(), target.model.get_output_embeddings())
    if init and cfg.init_from_target:
        model.init_from_target(target.model)
    return model.to(device=target.device, dtype=dtype or target.dtype)


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
        "state_dict": {k: v.to(dtype) for k, v in model.draft_state_dict().items()},
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
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise SpecServeError(f"{path} has checkpoint version {ckpt.get('version')}; this specserve reads "
                             f"version {CHECKPOINT_VERSION}", param="drafter")
    return ckpt


def load_model_from_checkpoint(path: Path, target: LoadedModel) -> BlockDrafterModel:
    """The drafter network of a checkpoint, bound to ``target`` (refused if trained for another target)."""
    ckpt = read_checkpoint(path)
    check_fingerprint(ckpt["target"], target, str(path))
    model = build_model(drafter_config(ckpt["config"]), target, init=False)
    model.load_state_dict({k: v.to(target.dtype) for k, v in ckpt["state_dict"].items()})
    return model.eval()


def default_checkpoint() -> Path | None:
    """The shipped block drafter for the embedded default model, or None when it is not installed."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def load_block_drafter(cfg: DrafterConfig, target: LoadedModel) -> BlockDrafter:
    """The block drafter ``cfg.path`` names (None: the shipped default), bound to ``target``."""
    path = Path(cfg.path) if cfg.path else default_checkpoint()
    if path is None:
        raise SpecServeError("no default block drafter is installed: pass --drafter block:CHECKPOINT "
                             "(train one with `specserve train-drafter`)", param="drafter")
    return BlockDrafter(load_model_from_checkpoint(path, target))


class _SeqState:
    """Per sequence: cached context keys/values of every draft layer, and sampling state."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None):
        self.params = params
        self.generator = generator
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_c: torch.Tensor | None = None  # [hidden] fused feature of the newest context position
        self.length = 0  # committed tokens whose target features are in ``kv``


class BlockDrafter(Drafter):
    """Drafts ``block_size`` tokens per pass from target features, the newest token and masks."""

    name = "block"

    def __init__(self, model: BlockDrafterModel):
        self.model = model
        self.target_layers = tuple(model.cfg.target_layers)
        self.block_size = model.cfg.block_size
        # The pass costs about the same for any k up to block_size; spread it over the block.
        self.draft_cost_per_token = DRAFT_PASS_COST / self.block_size
        self.states: dict[str, _SeqState] = {}

    @torch.inference_mode()
    def start(self, seq_id, prompt_ids, params, target_hidden=None) -> None:
        # A different seed stream from the target's, so draft and verify draws are independent.
        gen = None if params.greedy else make_generator(None if params.seed is None else params.seed + 1)
        self.states[seq_id] = _SeqState(params, gen)
        if target_hidden is not None and len(target_hidden):
            self._append(self.states[seq_id], target_hidden)

    @torch.inference_mode()
    def commit(self, seq_id, token_ids, target_hidden=None) -> None:
        state = self.states.get(seq_id)
        if state is not None and target_hidden is not None and len(target_hidden):
            self._append(state, target_hidden)

    def finish(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)

    @torch.inference_mode()
    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        state = self.states[seq_id]
        k = min(k, self.block_size)
        if k <= 0:
            return DraftBlock([])
        anchor_pos = len(token_ids) - 1
        if state.length != anchor_pos:
            raise RuntimeError(f"block drafter for {seq_id}: has target features for {state.length} tokens, "
                               f"expected {anchor_pos} (all committed tokens but the newest)")
        device = self.model.fc.weight.device
        if state.kv is None:  # a one-token prompt: no context yet
            state.kv = self._empty_kv(device)
            state.last_c = torch.zeros(self.model.cfg.hidden_size, dtype=self.model.fc.weight.dtype, device=device)
        ids = torch.tensor([[token_ids[-1]]], device=device)  # [1, 1]
        pos = torch.tensor([[anchor_pos]], device=device)  # [1, 1]
        hidden = self.model.block_hidden(state.kv, state.last_c[None, None], ids, pos)[0, 0, :k]  # [k, hidden]
        logits = self.model.logits(hidden)  # [k, vocab]
        if state.params.greedy:
            return DraftBlock(logits.argmax(-1).tolist())
        q = logits_to_probs(logits, state.params)  # [k, vocab]
        # Positions are drawn independently: q_i does not depend on the other draft tokens.
        tokens = torch.multinomial(q.cpu(), 1, generator=state.generator).squeeze(1)  # [k]
        return DraftBlock(tokens.tolist(), q)

    def _append(self, state: _SeqState, target_hidden: torch.Tensor) -> None:
        device = self.model.fc.weight.device
        n = target_hidden.shape[0]
        positions = torch.arange(state.length, state.length + n, device=device)[None]  # [1, n]
        c = self.model.fuse(target_hidden[None].to(device))  # [1, n, hidden]
        new = self.model.context_kv(c, positions)
        state.last_c = c[0, -1]
        if state.kv is None:
            state.kv = new
        else:
            state.kv = [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2))
                        for (k, v), (nk, nv) in zip(state.kv, new, strict=True)]
        state.length += n

    def _empty_kv(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, dtype = self.model.cfg, self.model.fc.weight.dtype
        shape = (1, cfg.num_kv_heads, 0, cfg.hidden_size // cfg.num_heads)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.model.layers]

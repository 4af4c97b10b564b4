"""The block drafter network and its config (DFlash style, arXiv 2602.06036).

A few transformer layers sit beside the target and reuse its frozen token embedding and
LM head. Inputs: **context features** (hidden states of several target layers for every
committed token but the newest, fused by one projection + RMSNorm into ``c_t``; every draft
layer prepends its own k/v projections of ``c`` to its keys and values) and **the block** (the
newest committed token, the anchor, followed by ``block_size - 1`` mask embeddings at positions
``n .. n + block_size - 1``). Attention inside the block is bidirectional. Output row i (after the
final norm and the LM head) predicts the token ``i + 1`` places after the anchor.

**Trimmed draft vocabulary.** The 49152 x 576 head dominates a one-layer drafter's cost. With
``draft_vocab_size`` set, the drafter scores only the ``draft_vocab`` target ids (the most
frequent tokens of the training data, a buffer saved with the weights) through those rows of the
target's head, and maps its choices back to target ids. Tokens outside it are never drafted
(q = 0 there), which costs acceptance only when the target would pick them.

**DFlash layout (opt-in).** Three config switches give the layout vLLM's DFlash drafters have, so
that ``specserve export-dflash`` maps a drafter onto it exactly: ``qk_norm`` (per-head RMSNorm on
queries and keys), ``last_context_input=False`` (no newest-context feature added to the block
inputs) and ``mask_rows`` (a block of the anchor and ``block_size`` masks; mask row i, at position
``n + i``, predicts its own token). Either layout returns ``block_size`` rows, row i predicting the
token ``i + 1`` places after the anchor, so training and drafting code is the same for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from specserve.config import MAX_SPECULATIVE_TOKENS, StrictModel
from specserve.errors import SpecServeError
from specserve.models import LoadedModel


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
    draft_vocab_size: int | None = Field(
        None, ge=2, description="Score only this many target tokens (the most frequent in the training data, "
        "stored with the weights) instead of the whole vocabulary: the LM head dominates the drafter's cost. "
        "None: the full vocabulary.",
    )
    init_from_target: bool = Field(
        False, description="Initialise the draft layers from the target's last layers (same shapes) instead "
        "of at random. Off by default: on SmolLM2 it trained no faster in a 25-step comparison.",
    )
    qk_norm: bool = Field(
        False, description="Per-head RMSNorm on queries and keys before RoPE (Qwen3's layer, which vLLM's DFlash "
        "drafters have). Off in the shipped checkpoint; on for a drafter that exports to DFlash exactly.",
    )
    last_context_input: bool = Field(
        True, description="Add the newest fused context feature to every block input (a direct path to the newest "
        "context). DFlash has no such input: off for a drafter that exports to DFlash exactly.",
    )
    mask_rows: bool = Field(
        False, description="Draft from block_size mask rows after the anchor (block_size + 1 inputs; mask row i "
        "predicts the token at its own position), as DFlash does, instead of from the anchor row and "
        "block_size - 1 masks (each row predicting the next position). On for a drafter that exports to "
        "DFlash exactly; the drafts are the same block_size rows either way.",
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
        vocab = target_config.vocab_size
        if cfg.draft_vocab_size is not None and cfg.draft_vocab_size > vocab:
            raise SpecServeError(f"draft_vocab_size {cfg.draft_vocab_size} exceeds the target's vocabulary "
                                 f"({vocab})", param="draft_vocab_size")
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise SpecServeError(f"hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads} and num_kv_heads "
                                 f"{cfg.num_kv_heads} must divide evenly", param="num_heads")
        return cfg


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
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(1, 2)  # [B, n, T, d]

    def kv(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        """Keys (rotated) and values [B, kv_heads, T, d] of already-normed inputs ``x`` [B, T, hidden]."""
        k = self._heads(self.k_proj(x), self.num_kv_heads)  # [B, kvH, T, d]
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, positions, inv_freq), self._heads(self.v_proj(x), self.num_kv_heads)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                mask: torch.Tensor | None, inv_freq: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] block states; ctx_k/ctx_v: [B, kv_heads, L, d]; mask: [B, 1, T, L + T] or None."""
        h = self.input_layernorm(x)
        q = self._heads(self.q_proj(h), self.num_heads)  # [B, H, T, d]
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, positions, inv_freq)
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
        if cfg.draft_vocab_size is not None:
            # Target ids of the draft vocabulary; set from token frequencies before training, saved with the weights.
            self.register_buffer("draft_vocab", torch.arange(cfg.draft_vocab_size))
        else:
            self.draft_vocab = None
        self._head_cache: tuple | None = None  # (key, weight [draft vocab, hidden]) in the drafter's dtype

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Use target ids ``token_ids`` [draft_vocab_size] (distinct) as the draft vocabulary."""
        if self.draft_vocab is None or token_ids.shape != self.draft_vocab.shape:
            raise ValueError(f"draft vocabulary needs {self.cfg.draft_vocab_size} ids, got {tuple(token_ids.shape)}")
        if len(torch.unique(token_ids)) != len(token_ids):
            raise ValueError("draft vocabulary ids must be distinct")
        self.draft_vocab.copy_(token_ids)
        self._head_cache = None

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
                    if key in src_params:  # a Llama target has no q_norm / k_norm: those stay at one
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
            added to every block input (unless ``last_context_input`` is off): a direct path to the newest
            context, which the layers would otherwise have to learn to find by attention (EAGLE feeds the
            same feature this way).
        anchor_ids, anchor_pos: [B, M] the anchor token of each block and its position.
        ctx_mask: [B, M, L] which context positions each block may see (None: all of them, M = 1).
        """
        embed = self._shared[0]
        b, m = anchor_ids.shape
        # k inputs per block: the anchor and the masks (one more mask in the DFlash layout).
        k = self.cfg.block_size + self.cfg.mask_rows
        x = self.mask_embedding.to(self.fc.weight.dtype).expand(b, m, k, -1).clone()  # [B, M, k, hidden]
        x[:, :, 0] = embed(anchor_ids).to(x.dtype)
        if self.cfg.last_context_input:
            x = x + last_c.to(x.dtype)[:, :, None]
        x = x.view(b, m * k, -1)  # [B, T = M * k, hidden]
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
        out = self.norm(x).view(b, m, k, -1)  # [B, M, k, hidden]
        return out[:, :, 1:] if self.cfg.mask_rows else out

    @property
    def logits_dim(self) -> int:
        """Size of the draft vocabulary (the target's whole vocabulary unless trimmed)."""
        if self.draft_vocab is not None:
            return len(self.draft_vocab)
        return self._shared[1].weight.shape[0]

    def forward(self, features: torch.Tensor, anchor_ids: torch.Tensor, anchor_pos: torch.Tensor,
                ctx_mask: torch.Tensor) -> torch.Tensor:
        """Training pass: draft-vocabulary logits [B, M, K, draft vocab] of M blocks per sequence.

        features: [B, L, F] target features of every position; anchor_ids, anchor_pos: [B, M];
        ctx_mask: [B, M, L] the context positions each block sees (those before its anchor).
        """
        b, length = features.shape[:2]
        positions = torch.arange(length, device=features.device)[None].expand(b, -1)  # [B, L]
        c = self.fuse(features)  # [B, L, hidden]
        ctx_kv = self.context_kv(c, positions)
        before = (anchor_pos - 1).clamp_min(0)  # [B, M] the newest context position of each block
        last_c = torch.gather(c, 1, before[..., None].expand(-1, -1, c.shape[-1]))  # [B, M, hidden]
        last_c = last_c * (anchor_pos > 0)[..., None]  # an anchor at position 0 has no context
        return self.logits(self.block_hidden(ctx_kv, last_c, anchor_ids, anchor_pos, ctx_mask))

    @property
    def target_vocab_size(self) -> int:
        """Rows of the target's LM head (the vocabulary verification scores)."""
        return self._shared[1].weight.shape[0]

    def head_weight(self) -> torch.Tensor:
        """The rows of the target's LM head the drafter scores [draft vocab, hidden], in the drafter's dtype.

        Cached: the head is frozen, and slicing or casting 49152 x 576 on every pass would cost more
        than the pass itself.
        """
        weight = self._shared[1].weight
        dtype = self.fc.weight.dtype
        key = (dtype, weight.device, None if self.draft_vocab is None else self.draft_vocab._version)
        if self._head_cache is None or self._head_cache[0] != key:
            w = weight.detach() if self.draft_vocab is None else weight.detach()[self.draft_vocab]
            self._head_cache = (key, w.to(dtype))
        return self._head_cache[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., draft vocab] (fp32) through the target's (frozen) LM head rows."""
        return F.linear(hidden.to(self.fc.weight.dtype), self.head_weight()).float()

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft-vocabulary indices ``draft_ids`` (any shape)."""
        return draft_ids if self.draft_vocab is None else self.draft_vocab[draft_ids]

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """The drafter's own weights and draft vocabulary (nothing of the target's)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}


def build_model(cfg: BlockDrafterConfig, target: LoadedModel, *, init: bool = True,
                dtype: torch.dtype | None = None) -> BlockDrafterModel:
    """A drafter for ``target`` in ``dtype`` (default: the target's); ``init`` applies ``init_from_target``."""
    cfg = cfg.resolved(target.model.config)
    model = BlockDrafterModel(cfg, target.model.get_input_embeddings(), target.model.get_output_embeddings())
    if init and cfg.init_from_target:
        model.init_from_target(target.model)
    return model.to(device=target.device, dtype=dtype or target.dtype)



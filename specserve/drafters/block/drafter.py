"""The block drafter at serving time: per-sequence context caches, one pass per block.

With temperature > 0 each position is sampled independently from its own distribution
``q_i = logits_to_probs(logits_i)`` (zero outside a trimmed draft vocabulary); ``q_i`` does not
depend on the earlier draft tokens, so it is the exact conditional distribution the acceptance
test needs and sampling stays lossless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specserve.config import DrafterConfig, SamplingParams
from specserve.drafters.base import NO_DRAFT, DraftBlock, Drafter
from specserve.drafters.block.ckpt import default_checkpoint, load_model_from_checkpoint
from specserve.drafters.block.net import BlockDrafterModel
from specserve.errors import SpecServeError
from specserve.models import LoadedModel
from specserve.sampling import logits_to_probs, make_generator

#: Measured in bf16: one drafting pass (1 layer + the full LM head over the block) costs ~0.15-0.2 of a
#: target step.
DRAFT_PASS_COST = 0.2


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
        self.vocab_size = model.target_vocab_size
        # The pass costs about the same for any k up to block_size; spread it over the block. A trimmed
        # vocabulary shrinks the head, which dominates the pass: scale by the weights a pass multiplies.
        hidden = model.cfg.hidden_size
        layers = sum(p.numel() for p in model.layers.parameters())
        share = (layers + model.logits_dim * hidden) / (layers + model.target_vocab_size * hidden)
        self.draft_cost_per_token = DRAFT_PASS_COST * share / self.block_size
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
            return NO_DRAFT
        logits = self._block_logits(state, seq_id, token_ids, k)  # [k, draft vocab]
        if state.params.greedy:
            return DraftBlock(self.model.to_target_ids(logits.argmax(-1)).tolist())
        q = logits_to_probs(logits, state.params)  # [k, draft vocab]
        # Positions are drawn independently: q_i does not depend on the other draft tokens.
        picks = torch.multinomial(q.cpu(), 1, generator=state.generator).squeeze(1)  # [k]
        tokens = self.model.to_target_ids(picks.to(q.device))
        return DraftBlock(tokens.tolist(), self._to_target_vocab(q))

    @torch.inference_mode()
    def position_probs(self, seq_id: str, token_ids: list[int], k: int) -> torch.Tensor:
        """[k', vocab] with k' = min(k, block_size): the drafter's distribution of each of the next k' tokens.

        The positions of one block are independent distributions (one pass drafts them all), so they
        form a lattice: :class:`specserve.drafters.tree.TreeDrafter` builds draft trees from it. Greedy
        requests get the softmax at temperature 1 (the ranking is what matters there).
        """
        state = self.states[seq_id]
        k = min(k, self.block_size)
        if k <= 0:
            return torch.zeros(0, self.vocab_size)
        logits = self._block_logits(state, seq_id, token_ids, k)
        q = torch.softmax(logits.float(), -1) if state.params.greedy else logits_to_probs(logits, state.params)
        return self._to_target_vocab(q)

    def _block_logits(self, state: _SeqState, seq_id: str, token_ids: list[int], k: int) -> torch.Tensor:
        """One drafting pass: logits [k, draft vocab] of the k tokens after ``token_ids``."""
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
        return self.model.logits(hidden)  # [k, draft vocab]

    def _to_target_vocab(self, q: torch.Tensor) -> torch.Tensor:
        """[k, draft vocab] -> [k, target vocab]: zero for tokens the drafter never proposes."""
        if self.model.draft_vocab is None:
            return q
        full = q.new_zeros(q.shape[0], self.vocab_size)  # [k, vocab]
        return full.index_copy_(1, self.model.draft_vocab, q)

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

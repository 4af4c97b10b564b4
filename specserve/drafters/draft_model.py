"""Drafting with a small causal LM that shares the target's tokenizer.

Each sequence keeps its own KV cache and the token ids it holds. ``propose`` first feeds
the committed tokens the cache lacks (after a rejection, or the bonus token), then
decodes k tokens one at a time: greedily when the request is greedy, otherwise by
sampling from the same temperature/top-k/top-p distribution the target uses, returning
those distributions as q for the acceptance test. ``commit`` crops the cache to the
longest prefix of the committed tokens.

``propose_tree`` expands a tree level by level as EAGLE-2 does (arXiv 2406.16858): each level
feeds the ``branching`` most probable nodes of the previous level in one pass (tree attention
mask over the cache), gives each its ``branching`` most probable children, and finally keeps the
``max_nodes`` most probable nodes. The choice is deterministic (no q), which verification of
trees handles exactly for greedy and sampled requests alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from specserve.config import SamplingParams, TreeConfig
from specserve.drafters.base import NO_DRAFT, DraftBlock, Drafter, common_prefix_len
from specserve.models import LoadedModel
from specserve.sampling import logits_to_probs, make_generator, sample
from specserve.tree import ROOT, DraftTree, additive_mask, ancestor_matrix, prune


@dataclass
class _DraftState:
    cache: DynamicCache
    params: SamplingParams
    generator: torch.Generator | None
    cached_ids: list[int] = field(default_factory=list)


class DraftModelDrafter(Drafter):
    """An HF causal LM as drafter, with per-sequence KV caches."""

    name = "draft_model"

    def __init__(self, draft: LoadedModel, target_num_params: int | None = None):
        self.draft = draft
        self.states: dict[str, _DraftState] = {}
        n_draft = sum(p.numel() for p in draft.model.parameters())
        # Batch-1 decoding is memory-bound: step cost scales roughly with parameter count.
        self.draft_cost_per_token = min(1.0, n_draft / target_num_params) if target_num_params else 0.1

    def start(self, seq_id, prompt_ids, params, target_hidden=None) -> None:
        # A different seed stream from the target's, so draft and verify draws are independent.
        gen = None if params.greedy else make_generator(None if params.seed is None else params.seed + 1)
        self.states[seq_id] = _DraftState(DynamicCache(config=self.draft.model.config), params, gen)

    @torch.inference_mode()
    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        state = self.states[seq_id]
        if k <= 0:
            return NO_DRAFT
        self._rollback(state, token_ids)
        pending = token_ids[len(state.cached_ids) :]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self._feed(state, pending)[-1:]  # [1, vocab]
            if state.params.greedy:
                tok = int(logits.argmax(-1).item())
            else:
                q = logits_to_probs(logits, state.params)[0]  # [vocab]
                tok = sample(q, state.generator)
                probs.append(q)
            tokens.append(tok)
            pending = [tok]
        return DraftBlock(tokens, torch.stack(probs) if probs else None)

    @torch.inference_mode()
    def propose_tree(self, seq_id: str, token_ids: list[int], budget: TreeConfig) -> DraftTree:
        """A draft tree after ``token_ids`` by dynamic top-k expansion, pruned to ``budget``."""
        state = self.states[seq_id]
        tree = DraftTree()
        if budget.max_nodes <= 0 or budget.max_depth <= 0:
            return tree
        self._rollback(state, token_ids)
        num_prefix = len(token_ids)  # the draft cache holds every committed token once pending is fed
        dist = self._tree_dist(state, self._feed(state, token_ids[len(state.cached_ids) :])[-1:])  # [1, vocab]
        frontier = [ROOT]  # nodes whose children the last pass predicted, with their distributions in dist
        fed: list[int] = []  # tree nodes in the order their entries sit in the draft cache
        path_prob = {ROOT: 1.0}
        try:
            for depth in range(1, budget.max_depth + 1):
                level = []
                top_p, top_i = torch.topk(dist, budget.branching, dim=-1)  # [len(frontier), branching]
                for parent, ps, ts in zip(frontier, top_p.tolist(), top_i.tolist()):
                    for prob, tok in zip(ps, ts):
                        if prob > 0:
                            node = tree.add(tok, parent, prob)
                            path_prob[node] = path_prob[parent] * prob
                            level.append(node)
                if depth == budget.max_depth or not level:
                    break
                # Expand only the most probable nodes of this level: one pass of at most `branching` inputs.
                frontier = sorted(level, key=lambda i: -path_prob[i])[: budget.branching]
                fed_now = fed + frontier
                anc = ancestor_matrix(tree.parents)  # [n, n]
                visible = torch.cat([torch.ones(len(frontier), num_prefix, dtype=torch.bool),
                                     anc[frontier][:, fed_now]], dim=1)  # [f, num_prefix + len(fed_now)]
                depths = tree.depths
                logits = self._feed_tree(state, [tree.tokens[i] for i in frontier],
                                         additive_mask(visible, self.draft.dtype),
                                         [num_prefix - 1 + depths[i] for i in frontier])  # [f, vocab]
                fed = fed_now
                dist = self._tree_dist(state, logits)
        finally:
            if fed:
                state.cache.crop(-len(fed))
        return prune(tree, budget)

    def _tree_dist(self, state: _DraftState, logits: torch.Tensor) -> torch.Tensor:
        """[n, vocab] logits to the distributions the tree ranks by: the request's sampling
        distribution, or the plain softmax when greedy."""
        if state.params.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return logits_to_probs(logits, state.params)

    def _feed_tree(self, state: _DraftState, ids: list[int], mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Feed tree nodes (not committed tokens: ``cached_ids`` is left alone) and return their logits [f, vocab]."""
        device = self.draft.device
        out = self.draft.model(
            input_ids=torch.tensor([ids], device=device),  # [1, f]
            attention_mask=mask.to(device),  # [1, 1, f, cache + f]
            position_ids=torch.tensor([positions], device=device),  # [1, f]
            past_key_values=state.cache,
            use_cache=True,
        )
        return out.logits[0]  # [f, vocab]

    def commit(self, seq_id, token_ids, target_hidden=None) -> None:
        state = self.states.get(seq_id)
        if state is not None:
            self._rollback(state, token_ids)

    def finish(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)

    def _feed(self, state: _DraftState, ids: list[int]) -> torch.Tensor:
        out = self.draft.model(
            input_ids=torch.tensor([ids], device=self.draft.device), past_key_values=state.cache, use_cache=True
        )
        state.cached_ids.extend(ids)
        return out.logits[0]  # [len(ids), vocab]

    @staticmethod
    def _rollback(state: _DraftState, token_ids: list[int]) -> None:
        # Keep at most all-but-the-newest committed token: the next propose must feed something.
        keep = min(common_prefix_len(state.cached_ids, token_ids), len(token_ids) - 1)
        drop = len(state.cached_ids) - keep
        if drop > 0:
            state.cache.crop(-drop)
            del state.cached_ids[keep:]

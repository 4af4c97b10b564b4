"""Any drafter as a tree drafter: draft trees under a node budget that adapts to acceptance."""

from __future__ import annotations

from specserve.config import TreeConfig
from specserve.drafters.base import Drafter
from specserve.tree import DraftTree, tree_from_position_probs


class AdaptiveTreeBudget:
    """Shrinks the node budget while acceptance is low, grows it back while it is high.

    The tree's value is the extra accepted length it buys over its most probable path; when
    even the main path is rarely accepted, extra branches mostly cost verification. The budget
    follows an exponentially weighted accepted length per step relative to the tree's depth:
    below ``low`` of the depth it halves (down to a chain, budget = depth), above ``high`` it
    doubles (up to ``max_nodes``).
    """

    def __init__(self, cfg: TreeConfig, *, decay: float = 0.8, low: float = 0.25, high: float = 0.5):
        self.cfg = cfg
        self.decay, self.low, self.high = decay, low, high
        self.max_nodes = cfg.max_nodes
        self.ratio = (low + high) / 2  # prior: neither shrink nor grow on the first step

    def budget(self, depth: int) -> TreeConfig:
        """The tree config for the next step, at most ``depth`` deep (adaptive k's choice)."""
        depth = max(1, min(depth, self.cfg.max_depth))
        nodes = min(self.cfg.max_nodes, max(self.max_nodes, depth))
        return self.cfg.model_copy(update={"max_nodes": nodes, "max_depth": depth})

    def update(self, depth: int, num_accepted: int) -> None:
        """Learn from one verified tree ``depth`` deep that had ``num_accepted`` tokens accepted."""
        if not self.cfg.adaptive or depth == 0:
            return
        self.ratio = self.decay * self.ratio + (1 - self.decay) * num_accepted / depth
        if self.ratio < self.low:
            self.max_nodes = max(depth, self.max_nodes // 2)
        elif self.ratio > self.high:
            self.max_nodes = min(self.cfg.max_nodes, self.max_nodes * 2)


class TreeDrafter(Drafter):
    """Any drafter, proposing draft trees instead of blocks.

    ``propose(seq_id, token_ids, k)`` returns a :class:`DraftTree` at most k deep (a tree is a
    kind of proposal: the decode loop treats it as a block as long as its deepest path, and the
    verifier checks it with :meth:`specserve.target.Verifier.step_tree`). Drafters with a
    ``propose_tree(seq_id, token_ids, budget)`` method build their own trees; drafters whose
    positions are independent distributions may instead offer ``position_probs(seq_id, token_ids,
    k) -> [k, vocab]`` and get the lattice of :func:`tree_from_position_probs`; others give their
    block as a chain. The node budget adapts per sequence (:class:`AdaptiveTreeBudget`).
    """

    def __init__(self, inner: Drafter, cfg: TreeConfig):
        self.inner = inner
        self.cfg = cfg
        self.name = inner.name
        self.draft_cost_per_token = inner.draft_cost_per_token
        self.target_layers = inner.target_layers
        self.budgets: dict[str, AdaptiveTreeBudget] = {}
        self.last: dict[str, tuple[int, int]] = {}  # seq_id -> (committed length, depth) of the last tree
        self.num_nodes = 0  # nodes proposed over all sequences (benchmarks read it)

    def start(self, seq_id, prompt_ids, params, target_hidden=None) -> None:
        self.budgets[seq_id] = AdaptiveTreeBudget(self.cfg)
        self.inner.start(seq_id, prompt_ids, params, target_hidden)

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftTree:  # type: ignore[override]
        """A draft tree at most ``k`` deep within this sequence's current budget."""
        budget = self.budgets[seq_id].budget(k)
        propose_tree = getattr(self.inner, "propose_tree", None)
        position_probs = getattr(self.inner, "position_probs", None)
        if propose_tree is not None:
            tree = propose_tree(seq_id, token_ids, budget)
        elif position_probs is not None:  # a parallel block drafter: a lattice of independent positions
            tree = tree_from_position_probs(position_probs(seq_id, token_ids, k), budget)
        else:
            block = self.inner.propose(seq_id, token_ids, k)
            tree = DraftTree.chain(block.token_ids[:k], block.probs[:k] if block.probs is not None else None)
        self.last[seq_id] = (len(token_ids), tree.depth)
        self.num_nodes += len(tree)
        return tree

    def commit(self, seq_id, token_ids, target_hidden=None) -> None:
        last = self.last.pop(seq_id, None)
        if last is not None and seq_id in self.budgets:
            length, depth = last
            self.budgets[seq_id].update(depth, max(0, len(token_ids) - length - 1))
        self.inner.commit(seq_id, token_ids, target_hidden)

    def finish(self, seq_id: str) -> None:
        self.budgets.pop(seq_id, None)
        self.last.pop(seq_id, None)
        self.inner.finish(seq_id)

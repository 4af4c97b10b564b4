"""Any drafter as a tree drafter: draft trees under a node budget that adapts to acceptance."""

from __future__ import annotations

from specserve.config import TreeConfig
from specserve.drafters.base import Drafter, common_prefix_len
from specserve.tree import DraftTree, tree_from_position_probs


class AdaptiveTreeBudget:
    """Shrinks the node budget while the tree's branches add little, grows it back while they add a lot.

    What a tree buys over a chain is what its branches add: the tokens accepted beyond what its
    most probable path alone would have had accepted. The budget follows the exponentially
    weighted **gain** (accepted by the tree minus accepted by its main path) relative to the tokens
    the main path yields per step (its accepted tokens + 1). Below ``low`` the budget halves, above
    ``high`` it doubles (up to ``max_nodes``). Once it is below the depth (fewer nodes than the
    chain would draft), the step drafts the chain itself: no branches, as deep as the depth, so it
    costs what the chain costs (a lone chain-shaped tree is verified without a mask). A chain
    cannot show a gain, so in that state every ``probe_every``-th step drafts the full tree again.

    This judges the tree by its branches, not by overall acceptance: a weak drafter whose second
    choices carry probability (the block drafter's lattice) keeps its wide tree, while an n-gram
    tree whose extra matches are never right shrinks to its chain.
    """

    def __init__(self, cfg: TreeConfig, *, decay: float = 0.8, low: float = 0.05, high: float = 0.15,
                 probe_every: int = 8):
        self.cfg = cfg
        self.decay, self.low, self.high = decay, low, high
        self.probe_every = probe_every
        self.max_nodes = cfg.max_nodes
        # Prior: a gain between low and high (neither shrink nor grow on the first step).
        self.gain, self.base = (low + high) / 2, 1.0
        self.chain_steps = 0

    def budget(self, depth: int) -> TreeConfig:
        """The tree config for the next step, at most ``depth`` deep (adaptive k's choice)."""
        depth = max(1, min(depth, self.cfg.max_depth))
        if not self.cfg.adaptive or self.max_nodes >= depth:
            return self.cfg.model_copy(update={"max_nodes": min(self.cfg.max_nodes, self.max_nodes), "max_depth": depth})
        self.chain_steps += 1
        if self.chain_steps % self.probe_every == 0:  # probe: can the branches pay again?
            return self.cfg.model_copy(update={"max_depth": depth})
        # A budget below the chain's nodes would spend them on branches that do not pay: the chain itself
        # (spending nodes on branches shortens the main path, which may be what the chain would have had accepted).
        return self.cfg.model_copy(update={"max_nodes": depth, "max_depth": depth, "branching": 1})

    @property
    def relative_gain(self) -> float:
        """Weighted tokens the branches added per token the main path yielded."""
        return self.gain / self.base

    def update(self, num_accepted: int, main_accepted: int) -> None:
        """Learn from one verified tree: ``num_accepted`` tokens accepted, ``main_accepted`` of them
        on (a prefix of) its most probable path, i.e. what its chain alone would have had accepted."""
        if not self.cfg.adaptive:
            return
        d = self.decay
        self.gain = d * self.gain + (1 - d) * max(0, num_accepted - main_accepted)
        self.base = d * self.base + (1 - d) * (1 + main_accepted)
        if self.relative_gain < self.low:
            self.max_nodes = max(1, self.max_nodes // 2)
        elif self.relative_gain > self.high:
            self.max_nodes = min(self.cfg.max_nodes, max(2, self.max_nodes * 2))


class TreeDrafter(Drafter):
    """Any drafter, proposing draft trees instead of blocks.

    ``propose(seq_id, token_ids, k)`` returns a :class:`DraftTree` at most k deep (a tree is a
    kind of proposal: the decode loop treats it as a block as long as its deepest path, and the
    verifier checks it with :meth:`specserve.target.Verifier.verify`). Drafters with a
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
        self.learns_across_requests = inner.learns_across_requests
        self.budgets: dict[str, AdaptiveTreeBudget] = {}
        # seq_id -> (committed length, most probable path's tokens) of the last tree
        self.last: dict[str, tuple[int, list[int]]] = {}
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
        self.last[seq_id] = (len(token_ids), tree.main_path_tokens())
        self.num_nodes += len(tree)
        return tree

    def commit(self, seq_id, token_ids, target_hidden=None) -> None:
        last = self.last.pop(seq_id, None)
        if last is not None and seq_id in self.budgets:
            length, main = last
            new = token_ids[length:]  # accepted draft tokens, then the target's own token
            accepted = max(0, len(new) - 1)
            self.budgets[seq_id].update(accepted, min(accepted, common_prefix_len(main, new)))
        self.inner.commit(seq_id, token_ids, target_hidden)

    def finish(self, seq_id: str) -> None:
        self.budgets.pop(seq_id, None)
        self.last.pop(seq_id, None)
        self.inner.finish(seq_id)

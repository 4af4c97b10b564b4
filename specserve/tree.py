"""Token trees: several draft continuations verified in one target pass.

A draft tree hangs below the **root**, the newest committed token. Every node is one draft
token with a parent (another node, or the root), a depth (1 for the root's children) and the
drafter's probability of that token given its parent's path. The tree is stored flat, in
topological order (a parent always comes before its children), so it can be fed to the target
as it is: input 0 is the root, input ``i + 1`` is node ``i``.

In one target pass every input attends to the committed prefix and to its own ancestors (an
additive 4D mask, 0 where visible and the dtype's minimum elsewhere) at position
``prefix length + depth``; the logits of input ``i`` are then the target's next-token
distribution after the path that ends in it, exactly as if that path alone had been fed.

Pruning keeps the most probable paths under a budget (``max_nodes``, ``branching`` children per
node, ``max_depth``, ``min_path_prob``). Since a node's path probability never exceeds its
parent's, the ``max_nodes`` most probable nodes always form a tree (SpecInfer, arXiv 2305.09781;
EAGLE-2, arXiv 2406.16858; Sequoia, arXiv 2402.12374).

The tree's sampling semantics (what ``q`` means) are described in
:func:`specserve.sampling.verify_tree`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from specserve.config import TreeConfig
from specserve.errors import SpecServeError

#: Parent index of the root's children.
ROOT = -1


@dataclass
class DraftTree:
    """A flat draft tree below the newest committed token (nodes in topological order).

    ``q`` is None when the drafter chose every node deterministically (top-k of its distribution,
    n-gram matches, pruning by probability). Otherwise row 0 is the distribution the root's children
    were drawn from and row ``i + 1`` the one node ``i``'s children were drawn from, siblings in node
    order being successive draws without replacement (rows of unexpanded nodes are unused).
    """

    tokens: list[int] = field(default_factory=list)  # [n] draft token of each node
    parents: list[int] = field(default_factory=list)  # [n] parent node index, ROOT for depth 1
    node_probs: list[float] = field(default_factory=list)  # [n] drafter's q(token | parent's path)
    q: torch.Tensor | None = None  # [n + 1, vocab] or None (deterministic tree)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        """[n] depth of each node (1 = child of the root)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p == ROOT else out[p] + 1)
        return out

    @property
    def depth(self) -> int:
        """Length of the longest path (0 for an empty tree)."""
        return max(self.depths, default=0)

    @property
    def path_probs(self) -> list[float]:
        """[n] product of the drafter's probabilities from the root to each node."""
        out: list[float] = []
        for p, prob in zip(self.parents, self.node_probs):
            out.append(prob * (1.0 if p == ROOT else out[p]))
        return out

    @property
    def token_ids(self) -> list[int]:
        """The path the tree bets on as a whole: the most probable of its deepest paths.

        Its length is the tree's depth, so the decode loop's room checks and per-depth statistics
        treat a tree like a block of that length; a pipelining proposer assumes this path.
        """
        depths, path_probs = self.depths, self.path_probs
        if not depths:
            return []
        deepest = max(range(len(self)), key=lambda i: (depths[i], path_probs[i], -i))
        return [self.tokens[i] for i in self.path(deepest)]

    def truncated(self, k: int) -> DraftTree:
        """The nodes at most ``k`` deep (a drafter may return a deeper tree than was asked)."""
        if self.depth <= k:
            return self
        return subtree(self, [i for i, d in enumerate(self.depths) if d <= k])

    def main_path_tokens(self) -> list[int]:
        """Tokens of the most probable path: from the root, the most probable child each time (first on ties)."""
        out, node = [], ROOT
        while True:
            kids = self.children(node)
            if not kids:
                return out
            node = max(kids, key=lambda i: (self.node_probs[i], -i))
            out.append(self.tokens[node])

    @property
    def is_chain(self) -> bool:
        """True when every node is the only child of the one before it (a block drafted as a tree)."""
        return all(p == i - 1 for i, p in enumerate(self.parents))  # node 0's parent: ROOT (-1)

    def children(self, node: int) -> list[int]:
        """Indices of ``node``'s children in node order (``node`` = ROOT for the root's)."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def add(self, token: int, parent: int, prob: float) -> int:
        """Append a node (its parent must already exist) and return its index."""
        assert parent == ROOT or 0 <= parent < len(self.tokens), parent
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.node_probs.append(float(prob))
        return len(self.tokens) - 1

    def check(self) -> None:
        """Raise ValueError unless the tree is topologically ordered with distinct siblings."""
        seen: set[tuple[int, int]] = set()
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if not (p == ROOT or 0 <= p < i):
                raise ValueError(f"node {i}'s parent {p} does not come before it")
            if (p, t) in seen:
                raise ValueError(f"node {i} repeats token {t} among its siblings")
            seen.add((p, t))
        if self.q is not None and self.q.shape[0] != len(self.tokens) + 1:
            raise ValueError(f"q has {self.q.shape[0]} rows for {len(self.tokens)} nodes (need n + 1)")

    @classmethod
    def chain(cls, tokens: list[int], probs: torch.Tensor | None = None) -> DraftTree:
        """A chain as a tree (each node the only child of the previous one); ``probs``: [k, vocab] or None."""
        tree = cls()
        for i, t in enumerate(tokens):
            tree.add(t, i - 1 if i else ROOT, float(probs[i, t]) if probs is not None else 1.0)
        if probs is not None:
            tree.q = torch.cat([probs.float(), probs.new_zeros(1, probs.shape[-1]).float()])  # [k + 1, vocab]
        return tree


def prune(tree: DraftTree, cfg: TreeConfig) -> DraftTree:
    """The sub-tree of the most probable paths within the budget of ``cfg``.

    Per node only the ``branching`` most probable children are candidates; nodes deeper than
    ``max_depth`` or whose path probability is below ``min_path_prob`` go; of the rest, the
    ``max_nodes`` with the highest path probability stay (ties: shallower, then earlier first).
    Pruning a tree with ``q`` drops whole suffixes of sibling lists only when they are the least
    probable, which is what a deterministic tree needs; sampled trees should be built within budget.
    """
    depths, path_probs = tree.depths, tree.path_probs
    allowed = [False] * len(tree)
    ranked_children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        ranked_children.setdefault(p, []).append(i)
    for kids in ranked_children.values():
        kids.sort(key=lambda i: (-tree.node_probs[i], i))
        for i in kids[: cfg.branching]:
            allowed[i] = True
    candidates = []
    for i in range(len(tree)):
        p = tree.parents[i]
        ok = allowed[i] and (p == ROOT or allowed[p]) and depths[i] <= cfg.max_depth
        ok = ok and path_probs[i] >= cfg.min_path_prob
        allowed[i] = ok
        if ok:
            candidates.append(i)
    candidates.sort(key=lambda i: (-path_probs[i], depths[i], i))
    keep = sorted(candidates[: cfg.max_nodes])
    return subtree(tree, keep)


def subtree(tree: DraftTree, keep: list[int]) -> DraftTree:
    """The nodes ``keep`` (sorted, closed under taking parents) as a new tree."""
    index = {old: new for new, old in enumerate(keep)}
    out = DraftTree()
    for old in keep:
        parent = tree.parents[old]
        assert parent == ROOT or parent in index, "kept nodes must include their ancestors"
        out.add(tree.tokens[old], ROOT if parent == ROOT else index[parent], tree.node_probs[old])
    if tree.q is not None:
        out.q = tree.q[[0] + [i + 1 for i in keep]]  # [len(keep) + 1, vocab]
    return out


def below(tree: DraftTree, token: int) -> DraftTree | None:
    """The subtree under the root's child carrying ``token``, re-rooted there (None: no such child).

    What a pipelined tree offers once the target's token after the previous block is known: that
    token's descendants become the next tree's nodes. Row 0 of ``q`` becomes the child's row.
    """
    child = next((i for i in tree.children(ROOT) if tree.tokens[i] == token), None)
    if child is None:
        return None
    index: dict[int, int] = {}
    out = DraftTree()
    for i in range(child + 1, len(tree)):
        parent = tree.parents[i]
        if parent == child:
            index[i] = out.add(tree.tokens[i], ROOT, tree.node_probs[i])
        elif parent in index:
            index[i] = out.add(tree.tokens[i], index[parent], tree.node_probs[i])
    if tree.q is not None:
        out.q = tree.q[[child + 1] + [i + 1 for i in index]]  # [len(out) + 1, vocab]
    return out


def tree_from_paths(paths: list[list[int]], weights: list[float] | None = None) -> DraftTree:
    """Merge continuations (e.g. several n-gram matches) into a trie.

    A node's probability is the share of the weight of its parent's paths that continue with it,
    so its path probability is the share of all weight that passes through it.
    """
    weights = weights or [1.0] * len(paths)
    tree = DraftTree()
    mass: list[float] = []  # [n] weight passing through each node
    index: dict[tuple[int, int], int] = {}
    for path, w in zip(paths, weights):
        parent = ROOT
        for t in path:
            node = index.get((parent, t))
            if node is None:
                node = tree.add(t, parent, 0.0)
                index[(parent, t)] = node
                mass.append(0.0)
            mass[node] += w
            parent = node
    total = sum(w for p, w in zip(paths, weights) if p)
    for i, p in enumerate(tree.parents):
        tree.node_probs[i] = mass[i] / (total if p == ROOT else mass[p])
    return tree


def tree_from_position_probs(probs: torch.Tensor, cfg: TreeConfig) -> DraftTree:
    """The most probable paths through a lattice of independent per-position distributions.

    probs: [k, vocab], row d the drafter's distribution of the token d + 1 places after the root
    (a parallel block drafter's output: each position's distribution does not depend on the tokens
    before it). Children of a node at depth d are the ``branching`` most probable tokens of row d;
    best-first search by path probability adds nodes until ``max_nodes``.
    """
    depth = min(probs.shape[0], cfg.max_depth)
    if depth == 0 or cfg.max_nodes == 0:
        return DraftTree()
    top_p, top_i = torch.topk(probs[:depth].float(), cfg.branching, dim=-1)  # [depth, branching]
    top_p, top_i = top_p.tolist(), top_i.tolist()
    tree = DraftTree()
    # Heap entries: (-path prob, tie-breaker, parent node, depth of the child, rank among siblings).
    heap = [(-top_p[0][0], 0, ROOT, 0, 0)]
    counter = 1
    path_prob = {ROOT: 1.0}
    while heap and len(tree) < cfg.max_nodes:
        neg, _, parent, d, rank = heapq.heappop(heap)
        if -neg < cfg.min_path_prob:
            break
        node = tree.add(top_i[d][rank], parent, top_p[d][rank])
        path_prob[node] = -neg
        # The next sibling and the first child are the only new candidates (both ranked lists).
        if rank + 1 < cfg.branching:
            heapq.heappush(heap, (-path_prob[parent] * top_p[d][rank + 1], counter, parent, d, rank + 1))
            counter += 1
        if d + 1 < depth:
            heapq.heappush(heap, (-path_prob[node] * top_p[d + 1][0], counter, node, d + 1, 0))
            counter += 1
    return tree


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when j is i or one of i's ancestors (``parents`` topological)."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)  # [n, n]
    for i, p in enumerate(parents):
        if p != ROOT:
            anc[i] |= anc[p]
    return anc


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, L] bool visibility to a [1, 1, n, L] additive mask: 0 where visible, the dtype's minimum elsewhere.

    transformers passes a 4D mask to the attention unchanged; a float mask is needed because the
    eager path adds the mask to the scores (a bool mask would add 0/1 and hide nothing).
    """
    mask = torch.zeros(visible.shape, dtype=dtype)  # [n, L]
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]  # [1, 1, n, L]


def flatten(tree: DraftTree, root_token: int, num_cached: int,
            dtype: torch.dtype) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Inputs for one target pass over ``[root] + tree`` after ``num_cached`` cached tokens.

    Returns the input ids (m = n + 1), the additive mask [1, 1, m, num_cached + m] (each input sees
    the cache, the root, its ancestors and itself) and the position ids [1, m] (num_cached + depth).
    """
    parents = [ROOT] + [p + 1 for p in tree.parents]  # input indices; input 0 is the root
    anc = ancestor_matrix(parents)  # [m, m]
    visible = torch.cat([torch.ones(len(parents), num_cached, dtype=torch.bool), anc], dim=1)  # [m, L + m]
    positions = torch.tensor([[num_cached] + [num_cached + d for d in tree.depths]])  # [1, m]
    return [root_token] + list(tree.tokens), additive_mask(visible, dtype), positions


def check_budget(cfg: TreeConfig, max_context: int) -> None:
    """Refuse a node budget the model's context cannot hold (every node takes a cache slot during verification)."""
    if cfg.max_nodes >= max_context:
        raise SpecServeError(
            f"tree budget of {cfg.max_nodes} nodes does not fit the model's context of {max_context} tokens: "
            f"pass fewer (at most {max_context // 4} leaves room for the text)",
            param="drafter.tree.max_nodes",
        )

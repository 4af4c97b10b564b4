"""Suffix decoding: draft what followed the current context before, in this request and in earlier ones.

Our implementation of the idea of SuffixDecoding (Oliaro et al., arXiv 2411.04975). Suffix tries
index token sequences: one per request over its prompt and committed output, and one global trie,
shared by every request of this drafter (one per model replica), over the outputs of finished
requests. A trie node stands for a token string of at most ``max_depth`` tokens and counts how often
that string occurred, so the counts of a node's children say how often each next token followed it.

Every committed token updates, per trie, the list of the context's suffixes that occurred before
(O(match length) per token; the text is never scanned). A step then drafts from the longest match:

* **scores**: a continuation's probability is its count over its siblings' counts. Where both tries
  match, their distributions are mixed with weights proportional to each match's length, the own
  text's counting double (a long recent match in the request's own text keeps the lead, as prompt
  lookup does on grounded edits); below a drafted token each source's weight is multiplied by the
  probability it gave that token (a posterior over the two sources);
* **draft length** follows the match, per trie (:class:`DraftRule`): nothing below ``min_match``
  matched tokens, at most ``spec_factor`` draft tokens per matched token, no path whose probability
  falls below ``min_prob``; adaptive k (``specserve.strategy``) caps it by what verification costs;
* **trees** (:meth:`SuffixDrafter.propose_tree`) branch where the counts disagree: best-first by path
  probability within the tree budget, so the least frequent continuations are pruned first.

Proposals are deterministic (``q`` None): the drafter never samples, so verification accepts a draft
token with the target's own probability of it and sampling stays exact (``sampling.verify_block``,
``sampling.verify_tree``); frequency scores only rank and cut the candidates. Drawing drafts from the
counts instead (q = counts) would be exact too, but most continuations were seen once (q one-hot
anyway), a deterministic tree's siblings accept the target's whole mass on them, and the drafter would
need each request's random generator.

Memory: a node whose string occurred once does not build its descendants; it points into the
sequence it came from (a *lazy tail*, like a suffix tree's leaf edge) and only turns into explicit
children when a second occurrence walks into it. A trie over n tokens so holds n nodes plus one per
repeated (start, length) window, not n * max_depth: 200 SmolLM2 chat responses (23.6k tokens) make
80k nodes, ~0.9 KB per token. The global trie keeps at most ``cache_requests`` sequences and
``cache_tokens`` tokens; the oldest leave first. Drafting costs ~0.1 ms per step in Python.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from specserve.config import SamplingParams, TreeConfig
from specserve.drafters.base import DraftBlock, Drafter
from specserve.tree import ROOT, DraftTree


class _Node:
    """One token string of a trie: how often it occurred, its newest occurrence and its continuations.

    A node that occurred once is *lazy*: it has no children, and its string continues with
    ``src[end], src[end + 1], ...`` (the sequence of its occurrence; the request's own trie reads a list
    that grows). A node that occurred more often has explicit children for every occurrence's next token.
    """

    __slots__ = ("count", "depth", "last", "children", "src", "end")

    def __init__(self, depth: int, last: int, src: list[int], end: int):
        self.count = 1  # occurrences of the string (indexed start positions whose window passes through)
        self.depth = depth  # string length
        self.last = last  # stamp of the newest occurrence: ties go to the most recent
        self.children: dict[int, _Node] | None = None  # next token -> node; None while lazy or without any
        self.src = src  # the newest occurrence's sequence ...
        self.end = end  # ... and the index just after the string in it


#: A position in a trie: a node and how many tokens of its lazy tail lie beyond it (0 for explicit nodes).
Cursor = tuple[_Node, int]


class SuffixTrie:
    """Counts of every token string of up to ``max_depth`` tokens of the indexed sequences.

    Every start position of a sequence is indexed with the window of ``max_depth`` tokens that
    follows it. Insertion is online (:meth:`extend`, one token at a time): the suffixes of the text
    so far that occurred before are still being walked down the trie ("active", by depth); each new
    token moves them one level down, and a suffix that meets an unseen continuation ends in a new lazy
    node. Per token this costs O(active) = O(longest repeated suffix). Sequences leave oldest first
    (:meth:`remove`), which keeps every lazy node's occurrence a live one.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = _Node(0, 0, [], 0)
        self.root.count = 0  # never lazy
        self.num_nodes = 1
        self.version = 0  # bumped by every whole-sequence insertion and removal: cursors into the trie go stale

    # ------------------------------------------------------------ building

    def extend(self, seq: list[int], pos: int, active: list[_Node], stamp: int) -> list[_Node]:
        """Index ``seq[pos]`` after ``seq[:pos]``; return the new active nodes.

        ``active``: the nodes of the suffixes of ``seq[:pos]`` that occurred before, by depth 1, 2, ...
        (contiguous: a string that occurred before has every suffix occur before too). Lazy nodes point
        into ``seq``, which may be the complete sequence or a live list that grows token by token.
        """
        token = seq[pos]
        out: list[_Node] = []
        for node in [self.root, *active]:  # the root: the suffix starting at the new token
            child = node.children.get(token) if node.children is not None else None
            if child is None:
                # First occurrence of this string: a lazy node, continued by the sequence itself.
                if node.children is None:
                    node.children = {}
                node.children[token] = _Node(node.depth + 1, stamp, seq, pos + 1)
                self.num_nodes += 1
                continue
            if child.count == 1:
                # A second occurrence: the first one's next token becomes an explicit (lazy) child, so
                # every occurrence's continuation is counted from now on. It exists: the first
                # occurrence ended before this one does.
                if child.depth < self.max_depth and child.end < len(child.src):
                    child.children = {child.src[child.end]: _Node(child.depth + 1, child.last, child.src,
                                                                  child.end + 1)}
                    self.num_nodes += 1
            child.count += 1
            child.last, child.src, child.end = stamp, seq, pos + 1
            if child.depth < self.max_depth:
                out.append(child)
        return out

    def insert(self, seq: list[int], stamp: int) -> None:
        """Index a whole sequence (``seq`` must not change afterwards: lazy nodes point into it)."""
        active: list[_Node] = []
        for pos in range(len(seq)):
            active = self.extend(seq, pos, active, stamp)
        self.version += 1

    def remove(self, seq: list[int]) -> None:
        """Un-index the oldest sequence :meth:`insert` indexed: decrement its windows' counts.

        A node left with no occurrence goes (with its subtree: counts shrink downwards); a node left
        with one turns lazy again, continued by its newest occurrence, which outlives this one because
        sequences leave oldest first. The trie then equals one built from the remaining sequences.
        """
        for start in range(len(seq)):
            node = self.root
            for pos in range(start, min(start + self.max_depth, len(seq))):
                child = node.children[seq[pos]]
                child.count -= 1
                if child.count == 0:
                    del node.children[seq[pos]]
                    self.num_nodes -= _size(child)
                    break
                if child.count == 1:
                    self.num_nodes -= _size(child) - 1
                    child.children = None
                    break
                node = child
        self.version += 1

    # ------------------------------------------------------------ reading

    def depth(self, cur: Cursor) -> int:
        """Length of the string at ``cur``."""
        return cur[0].depth + cur[1]

    def advance(self, cur: Cursor, token: int) -> Cursor | None:
        """The cursor of the string at ``cur`` followed by ``token``, or None if that never occurred."""
        node, off = cur
        if node.count == 1:  # lazy: the tail of its one occurrence
            i = node.end + off
            ok = node.depth + off < self.max_depth and i < len(node.src) and node.src[i] == token
            return (node, off + 1) if ok else None
        child = node.children.get(token) if node.children is not None else None
        return (child, 0) if child is not None else None

    def continuations(self, cur: Cursor) -> list[tuple[int, int, int, Cursor]]:
        """``(token, count, latest stamp, cursor)`` of every token that followed the string at ``cur``."""
        node, off = cur
        if node.count == 1:
            i = node.end + off
            if node.depth + off < self.max_depth and i < len(node.src):
                return [(node.src[i], node.count, node.last, (node, off + 1))]
            return []
        if not node.children:
            return []
        return [(t, c.count, c.last, (c, 0)) for t, c in node.children.items()]

    def step_matches(self, matches: list[Cursor], token: int) -> list[Cursor]:
        """The matched suffixes (by depth 1, 2, ...) after ``token`` follows the text of ``matches``."""
        out: list[Cursor] = []
        for cur in [(self.root, 0), *matches]:
            nxt = self.advance(cur, token)
            if nxt is None:
                break  # a longer suffix has this one as its suffix: it cannot have occurred either
            if self.depth(nxt) < self.max_depth:  # a string at full depth has no indexed continuation
                out.append(nxt)
        return out

    def matches(self, tokens: list[int]) -> list[Cursor]:
        """Every suffix of ``tokens`` shorter than ``max_depth`` that occurred, by depth (O(max_depth^2) at most)."""
        out: list[Cursor] = []
        for token in tokens[-(self.max_depth - 1):]:
            out = self.step_matches(out, token)
        return out

    def count(self, tokens: list[int]) -> int:
        """How often the string ``tokens`` occurred (0: never, or longer than ``max_depth``)."""
        cur: Cursor | None = (self.root, 0)
        for t in tokens:
            cur = self.advance(cur, t) if cur is not None else None
        if cur is None or not tokens:
            return 0
        return cur[0].count

    def next_counts(self, tokens: list[int]) -> dict[int, int]:
        """How often each token followed the string ``tokens``."""
        cur: Cursor | None = (self.root, 0)
        for t in tokens:
            cur = self.advance(cur, t) if cur is not None else None
        return {} if cur is None else {t: c for t, c, _, _ in self.continuations(cur)}


def _size(node: _Node) -> int:
    """Explicit nodes in the subtree of ``node`` (itself included)."""
    n, stack = 0, [node]
    while stack:
        x = stack.pop()
        n += 1
        if x.children:
            stack.extend(x.children.values())
    return n


class SuffixCache:
    """The global trie over finished requests' outputs: bounded, oldest first out, behind one lock.

    Requests running in several threads share it: every read of the trie (matching, drafting) and
    every insertion or eviction holds ``lock``.
    """

    def __init__(self, max_depth: int, max_requests: int, max_tokens: int):
        self.trie = SuffixTrie(max_depth)
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.lock = threading.Lock()
        self.sequences: deque[list[int]] = deque()  # indexed sequences, oldest first
        self.num_tokens = 0
        self.stamp = 0  # tokens ever indexed: the recency stamp of the next sequence

    def add(self, tokens: list[int]) -> None:
        """Index a finished request's tokens (at most ``max_tokens`` of them), then evict the oldest over a cap."""
        seq = list(tokens[: self.max_tokens])
        if not seq or self.max_requests == 0:
            return
        with self.lock:
            self.stamp += len(seq)
            self.trie.insert(seq, self.stamp)
            self.sequences.append(seq)
            self.num_tokens += len(seq)
            while len(self.sequences) > self.max_requests or self.num_tokens > self.max_tokens:
                old = self.sequences.popleft()
                self.trie.remove(old)
                self.num_tokens -= len(old)


@dataclass
class _Request:
    """One sequence's own trie and its matches in both tries."""

    prompt_len: int
    trie: SuffixTrie
    tokens: list[int] = field(default_factory=list)  # indexed so far (the own trie's lazy nodes read it)
    active: list[_Node] = field(default_factory=list)  # own suffixes that occurred before, by depth
    matches: list[Cursor] = field(default_factory=list)  # suffixes found in the global trie, by depth
    cache: SuffixCache | None = None  # the cross-request cache this request reads and, once finished, feeds
    tenant: str | None = None  # whose cache that is (None: the shared one)
    version: int = -1  # the global trie's version ``matches`` belongs to
    matched: int = 0  # tokens ``matches`` has seen


@dataclass(frozen=True)
class DraftRule:
    """How one trie's match turns into draft tokens."""

    min_match: int  # fewest matched tokens to draft from at all
    spec_factor: float  # draft tokens per matched token (k caps it)
    weight: float  # mixing weight per matched token where both tries match


@dataclass
class _Source:
    """A trie position a draft path continues from, with its mixing weight and how deep it may draft."""

    trie: SuffixTrie
    cursor: Cursor
    weight: float
    max_draft: int
    own: bool


class SuffixDrafter(Drafter):
    """Draft from the longest earlier occurrence of the context, in the request and across requests.

    The two tries follow different rules (measured by replaying SmolLM2's responses to ShareGPT, code and
    edit prompts): the request's own text is grounded, so a match of one token there drafts as far as
    prompt lookup does (own_spec_factor 8: up to k); the cache's counts come from other conversations, so
    its drafts grow with the match (spec_factor 2 per matched token, from min_match 2 on).
    """

    learns_across_requests = True

    name = "suffix"
    draft_cost_per_token = 0.0  # a few dict look-ups per draft token

    def __init__(self, *, max_depth: int = 48, min_match: int = 2, spec_factor: float = 2.0, own_min_match: int = 1,
                 own_spec_factor: float = 8.0, own_weight: float = 2.0, min_prob: float = 0.1,
                 cache_requests: int = 1000, cache_tokens: int = 100_000, cache_prompts: bool = False):
        self.max_depth = max_depth
        self.own_rule = DraftRule(own_min_match, own_spec_factor, own_weight)
        self.cache_rule = DraftRule(min_match, spec_factor, 1.0)
        self.min_prob = min_prob
        self.cache_prompts = cache_prompts
        self.cache_limits = (cache_requests, cache_tokens)
        self.cache = SuffixCache(max_depth, cache_requests, cache_tokens)  # shared by requests without a tenant
        self.tenant_caches: dict[str, SuffixCache] = {}  # one per tenant (API key): isolation, see ``start``
        self._tenants_lock = threading.Lock()
        self.requests: dict[str, _Request] = {}
        # Finished outputs for other replicas, (tenant, tokens), when a host shares the cache (``share``).
        self.outbox: list[tuple[str | None, list[int]]] | None = None

    def share(self) -> None:
        """Keep every finished request's cached tokens in ``outbox`` too, for a host that sends them to other
        replicas (:meth:`take_outbox`) and adds theirs here (:meth:`learn`)."""
        self.outbox = []

    def take_outbox(self) -> list[tuple[str | None, list[int]]]:
        """The finished outputs since the last call, (tenant, tokens) each, oldest first."""
        if self.outbox is None:
            return []
        with self._tenants_lock:
            out, self.outbox = self.outbox, []
        return out

    def learn(self, tenant: str | None, tokens: list[int]) -> None:
        """Add another replica's finished output to the tenant's cross-request cache (None: the shared one)."""
        self._cache_for(tenant).add(tokens)

    def learn_all(self, outputs: list[tuple[str | None, list[int]]]) -> int:
        """:meth:`learn` each (tenant, tokens) of other replicas' finished outputs; how many were added."""
        for tenant, tokens in outputs:
            self.learn(tenant, list(tokens))
        return len(outputs)

    def start(self, seq_id: str, prompt_ids: list[int], params: SamplingParams,
              target_hidden: torch.Tensor | None = None) -> None:
        """Start a request; with ``params.cache_tenant`` it reads and feeds that tenant's own cross-request cache.

        One shared cache lets one client's text speed up another's requests, a timing side channel; a
        cache per tenant closes it at the price of each tenant warming its own (each capped as the shared
        one is; tenants are API keys, so their number is the operator's).
        """
        req = _Request(len(prompt_ids), SuffixTrie(self.max_depth), cache=self._cache_for(params.cache_tenant),
                       tenant=params.cache_tenant)
        self._index(req, prompt_ids)
        self.requests[seq_id] = req

    def _cache_for(self, tenant: str | None) -> SuffixCache:
        if tenant is None:
            return self.cache
        with self._tenants_lock:
            cache = self.tenant_caches.get(tenant)
            if cache is None:
                cache = self.tenant_caches[tenant] = SuffixCache(self.max_depth, *self.cache_limits)
            return cache

    def stats(self) -> dict:
        """Cross-request cache sizes: requests and tokens held (all tenants), and the number of tenant caches."""
        caches = [self.cache, *self.tenant_caches.values()]
        return {"cache_requests": sum(len(c.sequences) for c in caches),
                "cache_tokens": sum(c.num_tokens for c in caches), "tenant_caches": len(self.tenant_caches)}

    def commit(self, seq_id: str, token_ids: list[int], target_hidden: torch.Tensor | None = None) -> None:
        self._sync(self.requests[seq_id], token_ids)

    def finish(self, seq_id: str) -> None:
        """Free the request's trie; its output (and prompt, with ``cache_prompts``) joins the global trie."""
        req = self.requests.pop(seq_id, None)
        if req is None:
            return
        tokens = req.tokens if self.cache_prompts else req.tokens[req.prompt_len:]
        req.cache.add(tokens)
        if self.outbox is not None and tokens:
            with self._tenants_lock:
                self.outbox.append((req.tenant, list(tokens)))

    def propose(self, seq_id: str, token_ids: list[int], k: int) -> DraftBlock:
        """A chain of up to ``k`` tokens: the most probable continuation, token by token."""
        tree = self._draft(seq_id, token_ids, max_nodes=k, max_depth=k, branching=1, min_path_prob=0.0)
        return DraftBlock(tree.tokens)  # one child per node: node order is the chain

    def propose_tree(self, seq_id: str, token_ids: list[int], budget: TreeConfig) -> DraftTree:
        """A tree of the most probable continuations within ``budget`` (deterministic: ``q`` None)."""
        return self._draft(seq_id, token_ids, max_nodes=budget.max_nodes, max_depth=budget.max_depth,
                           branching=budget.branching, min_path_prob=budget.min_path_prob)

    # ------------------------------------------------------------ internals

    def _index(self, req: _Request, tokens: list[int]) -> None:
        """Append ``tokens`` to the request's text and own trie."""
        for t in tokens:
            req.tokens.append(t)
            req.active = req.trie.extend(req.tokens, len(req.tokens) - 1, req.active, len(req.tokens))

    def _sync(self, req: _Request, token_ids: list[int]) -> None:
        """Bring the request's trie to ``token_ids`` (normally an extension; a rollback rebuilds it)."""
        n = len(req.tokens)
        if len(token_ids) < n or token_ids[:n] != req.tokens:
            fresh = _Request(req.prompt_len, SuffixTrie(self.max_depth), cache=req.cache, tenant=req.tenant)
            self._index(fresh, token_ids)
            req.trie, req.tokens, req.active, req.version = fresh.trie, fresh.tokens, fresh.active, -1
        else:
            self._index(req, token_ids[n:])

    def _draft(self, seq_id: str, token_ids: list[int], *, max_nodes: int, max_depth: int, branching: int,
               min_path_prob: float) -> DraftTree:
        req = self.requests[seq_id]
        self._sync(req, token_ids)
        if max_nodes <= 0 or max_depth <= 0:
            return DraftTree()
        with req.cache.lock:
            glob = req.cache.trie
            if req.version != glob.version:  # requests finished or left the cache: match afresh
                req.matches, req.version = glob.matches(req.tokens), glob.version
            else:
                for t in req.tokens[req.matched:]:
                    req.matches = glob.step_matches(req.matches, t)
            req.matched = len(req.tokens)
            own = _source(req.trie, [(n, 0) for n in req.active], max_depth, self.own_rule, own=True)
            cached = _source(glob, req.matches, max_depth, self.cache_rule, own=False)
            sources = [s for s in (own, cached) if s is not None]
            return best_first_tree(sources, max_nodes, max_depth, branching, max(min_path_prob, self.min_prob))


def _source(trie: SuffixTrie, matches: list[Cursor], k: int, rule: DraftRule, own: bool) -> _Source | None:
    """Where to draft from in one trie: its longest match, if at least ``rule.min_match`` tokens long,
    drafting up to ``rule.spec_factor`` tokens per matched token (at most ``k``)."""
    m = len(matches)
    if m < rule.min_match:
        return None
    length = min(k, math.ceil(rule.spec_factor * m))
    # The trie holds strings of max_depth tokens: draft from a shorter suffix of the match when the
    # longest leaves no room below it (its counts are as telling: both are repeats).
    depth = max(1, min(m, trie.max_depth - length))
    return _Source(trie, matches[depth - 1], rule.weight * m, min(length, trie.max_depth - depth), own)


def mixed_continuations(sources: list[_Source], depth: int) -> list[tuple[float, tuple, int, list[_Source]]]:
    """The tokens that may follow a draft path ``depth`` tokens deep, most probable first.

    Each source's probability of a token is its count over the counts of its siblings; sources mix by
    weight. Returns ``(probability, tie-breaker, token, the sources below it)``; below a token each source
    weighs its weight times the probability it gave the token.
    """
    live = []
    for s in sources:
        if depth < s.max_draft:
            conts = s.trie.continuations(s.cursor)
            if conts:
                live.append((s, conts))
    total_weight = sum(s.weight for s, _ in live)
    if total_weight <= 0:
        return []
    by_token: dict[int, list] = {}  # token -> [probability, tie-breaker, sources below]
    for s, conts in live:
        total = sum(c for _, c, _, _ in conts)
        for token, count, last, cur in conts:
            p = count / total
            entry = by_token.setdefault(token, [0.0, (False, -1), []])
            entry[0] += s.weight / total_weight * p
            entry[1] = max(entry[1], (s.own, last))  # ties: the request's own text, then the latest occurrence
            entry[2].append(_Source(s.trie, cur, s.weight * p, s.max_draft, s.own))
    ranked = [(p, tie, token, below) for token, (p, tie, below) in by_token.items()]
    ranked.sort(key=lambda e: (e[0], e[1]), reverse=True)
    return ranked


def best_first_tree(sources: list[_Source], max_nodes: int, max_depth: int, branching: int,
                    min_path_prob: float) -> DraftTree:
    """The ``max_nodes`` most probable draft nodes below the sources' matches, at most ``max_depth`` deep.

    Best-first by path probability (a node's is never above its parent's, so the nodes taken always
    form a tree); every node offers its ``branching`` most probable continuations; paths below
    ``min_path_prob`` are not drafted. ``branching`` 1 gives the chain of most probable tokens.
    """
    tree = DraftTree()
    tick = itertools.count()  # heap tie-breaker: earlier pushes (more probable siblings) first
    heap: list[tuple[float, int, int, int, float, int, list[_Source]]] = []

    def push(parent: int, path_prob: float, depth: int, below: list[_Source]) -> None:
        for p, _, token, srcs in mixed_continuations(below, depth)[:branching]:
            if path_prob * p >= min_path_prob:
                heapq.heappush(heap, (-path_prob * p, next(tick), parent, token, p, depth + 1, srcs))

    push(ROOT, 1.0, 0, sources)
    while heap and len(tree) < max_nodes:
        neg_prob, _, parent, token, p, depth, srcs = heapq.heappop(heap)
        node = tree.add(token, parent, p)
        if depth < max_depth:
            push(node, -neg_prob, depth, srcs)
    return tree

"""Acceptance of draft trees: hand-written greedy cases, a slow reference, seeded determinism, and
convergence of multi-branch rejection sampling to the target distribution (deterministic and
sampled trees)."""

from __future__ import annotations

import itertools

import pytest
import torch
from distribution import onehot_logits

from specserve.config import SamplingParams
from specserve.sampling import logits_to_probs, make_generator, verify_tree
from specserve.tree import ROOT, DraftTree

GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0)


def example_tree() -> DraftTree:
    """root -> 1 (-> 3 -> 5, -> 4), root -> 2 (-> 6)."""
    tree = DraftTree()
    a = tree.add(1, ROOT, 0.6)
    b = tree.add(2, ROOT, 0.3)
    c = tree.add(3, a, 0.5)
    tree.add(4, a, 0.4)
    tree.add(5, c, 0.9)
    tree.add(6, b, 0.9)
    return tree


# Target argmax per input row: root, node 0 (1), node 1 (2), node 2 (3), node 3 (4), node 4 (5), node 5 (6).
@pytest.mark.parametrize(
    "argmax,tokens,path",
    [
        ([1, 3, 0, 5, 0, 7, 0], [1, 3, 5, 7], [0, 2, 4]),  # deepest path accepted + bonus
        ([1, 4, 0, 9, 8, 0, 0], [1, 4, 8], [0, 3]),  # the second sibling, then a leaf's bonus
        ([2, 0, 6, 0, 0, 0, 9], [2, 6, 9], [1, 5]),  # the second branch at the root
        ([1, 7, 0, 0, 0, 0, 0], [1, 7], [0]),  # no child matches: recovered token
        ([9, 0, 0, 0, 0, 0, 0], [9], []),  # reject at once
    ],
    ids=["deepest-path", "second-sibling", "second-root-branch", "reject-middle", "reject-first"],
)
def test_greedy_tree_verification_takes_the_longest_matching_path(argmax, tokens, path):
    verdict = verify_tree(onehot_logits(argmax, vocab=10), example_tree(), GREEDY, None)
    assert verdict.tokens == tokens and verdict.path == path and verdict.num_accepted == len(path)


def test_empty_tree_is_plain_decoding():
    verdict = verify_tree(onehot_logits([4], vocab=10), DraftTree(), GREEDY, None)
    assert verdict.tokens == [4] and verdict.num_accepted == 0


def random_tree(vocab: int, q_rows: torch.Tensor | None, gen: torch.Generator, branching: int = 3,
                depth: int = 3, expand: float = 0.6) -> DraftTree:
    """A random tree. With ``q_rows`` [vocab-size rows, one per future node], children are drawn without
    replacement from their parent's row (Gumbel top-k); without, they are arbitrary distinct tokens."""
    tree = DraftTree()
    frontier = [ROOT]
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            if parent != ROOT and float(torch.rand(1, generator=gen)) > expand:
                continue
            m = int(torch.randint(1, branching + 1, (1,), generator=gen))
            if q_rows is not None:
                q = q_rows[(parent + 1) % len(q_rows)]
                gumbel = -torch.log(-torch.log(torch.rand(vocab, generator=gen).clamp_min(1e-12)))
                scores = torch.where(q > 0, q.log() + gumbel, torch.tensor(float("-inf")))
                kids = torch.topk(scores, min(m, int((q > 0).sum()))).indices.tolist()
            else:
                kids = torch.randperm(vocab, generator=gen)[:m].tolist()
            for tok in kids:
                nxt.append(tree.add(tok, parent, 0.5))
        frontier = nxt
    if q_rows is not None:
        n = len(tree)
        tree.q = torch.stack([q_rows[i % len(q_rows)] for i in range(n + 1)])  # [n + 1, vocab]
    return tree


def reference_verify_tree(p: list[list[float]], tree: DraftTree, uniforms, final_gen) -> list[int]:
    """Slow textbook multi-branch rejection sampling, recursive, on Python floats."""
    def at(node: int, accepted: list[int]) -> list[int]:
        kids = [i for i, par in enumerate(tree.parents) if par == node]
        if not kids:
            return accepted + [pick(p[node + 1])]
        if tree.q is None:
            kids.sort(key=lambda i: -tree.node_probs[i])
        r = list(p[node + 1])
        q = tree.q[node + 1].double().tolist() if tree.q is not None else None
        for c in kids:
            x = tree.tokens[c]
            u = next(uniforms)
            if q is None:
                if u < r[x]:
                    return at(c, accepted + [x])
                r[x] = 0.0
            else:
                s = sum(q)
                qi = [v / s for v in q] if s > 0 else q
                ratio = r[x] / qi[x] if qi[x] > 0 else float(r[x] > 0)
                if u < min(1.0, ratio):
                    return at(c, accepted + [x])
                r = [max(0.0, a - b) for a, b in zip(r, qi)]
                q[x] = 0.0
            total = sum(r)
            r = [v / total for v in r] if total > 0 else list(p[node + 1])
        return accepted + [pick(r)]

    def pick(dist: list[float]) -> int:
        return int(torch.multinomial(torch.tensor(dist, dtype=torch.float64).float(), 1, generator=final_gen))

    return at(ROOT, [])


@pytest.mark.parametrize("sampled", [False, True], ids=["deterministic-tree", "sampled-tree"])
def test_fast_tree_verification_equals_slow_reference(sampled):
    torch.manual_seed(0)
    vocab = 8
    shape_gen = make_generator(123)
    for trial in range(150):
        q_rows = torch.softmax(torch.randn(4, vocab) * 2, -1) if sampled else None
        tree = random_tree(vocab, q_rows, shape_gen)
        target_logits = torch.randn(len(tree) + 1, vocab) * 2
        got = verify_tree(target_logits, tree, SAMPLE, make_generator(trial))
        replay = make_generator(trial)
        uniforms = (float(torch.rand(1, dtype=torch.float64, generator=replay)) for _ in itertools.count())
        p = torch.softmax(target_logits, -1).double().tolist()
        expected = reference_verify_tree(p, tree, uniforms, replay)
        assert got.tokens == expected, trial


def test_seeded_tree_verification_is_deterministic():
    tree = random_tree(16, None, make_generator(5))
    logits = torch.randn(len(tree) + 1, 16)
    runs = [verify_tree(logits, tree, SAMPLE, make_generator(7)).tokens for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    others = {tuple(verify_tree(logits, tree, SAMPLE, make_generator(s)).tokens) for s in range(30)}
    assert len(others) > 1


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _q_equals_p(p_logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(p_logits[:4], -1)


def _q_zero_half(p_logits: torch.Tensor) -> torch.Tensor:
    q = torch.softmax(torch.randn(4, p_logits.shape[-1]), -1)
    q[:, : q.shape[-1] // 2] = 0.0
    return q / q.sum(-1, keepdim=True)


CASES = {
    "deterministic": None,
    "sampled-random-q": lambda p: torch.softmax(torch.randn(4, p.shape[-1]) * 3, -1),
    "sampled-q-equals-p": _q_equals_p,
    "sampled-q-zero-where-p-has-mass": _q_zero_half,
}


def empirical(make_tree, p_first: torch.Tensor, p_after: torch.Tensor, n: int, seed: int, params=SAMPLE,
              cond: int = 0):
    """Distributions of the first committed token and, when the tree's node for token ``cond`` was
    accepted, of the second. The target after a depth-1 node with token t has logits ``p_after[t]``."""
    gen = make_generator(seed)
    vocab = p_first.shape[-1]
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    tree = None
    for _ in range(n):
        tree = make_tree(tree)
        depths = tree.depths
        rows = [p_first] + [p_after[t] if d == 1 else p_first for t, d in zip(tree.tokens, depths)]
        verdict = verify_tree(torch.stack(rows), tree, params, gen)  # rows: [n + 1, vocab]
        first[verdict.tokens[0]] += 1
        if verdict.tokens[0] == cond and verdict.num_accepted >= 1:
            second[verdict.tokens[1]] += 1
    return first / n, second / max(1.0, float(second.sum()))


@pytest.mark.parametrize("case", list(CASES))
def test_tree_sampling_converges_to_the_target_distribution(case):
    """The committed tokens follow the target: the first after the root, the second after an accepted
    first node. The distance shrinks as samples grow and stays far below the distance to random
    references. A sampled tree is drawn afresh from q for every step, as a drafter would."""
    torch.manual_seed(1)
    vocab = 6
    p_first, p_after = torch.randn(vocab) * 1.5, torch.randn(vocab, vocab) * 1.5
    gen = make_generator(11)
    if CASES[case] is None:
        fixed = random_tree(vocab, None, gen, branching=3, depth=3, expand=0.9)
        fixed.tokens[0] = 0  # token 0 is a branch at the root (random_tree's tokens are distinct siblings)
        fixed.tokens[1:3] = [t if t != 0 else 5 for t in fixed.tokens[1:3]]
        fixed.check()

        def make_tree(_):
            return fixed
    else:
        rows = torch.stack([torch.softmax(p_first, -1), *torch.softmax(p_after, -1)])  # [vocab + 1, vocab]
        q_rows = rows if case == "sampled-q-equals-p" else CASES[case](torch.randn(vocab + 1, vocab))

        def make_tree(_):
            return random_tree(vocab, q_rows, gen, branching=3, depth=3, expand=0.9)

    cond = 0 if CASES[case] is None else int(q_rows[0].argmax())  # a first token the tree drafts
    target_first, target_second = torch.softmax(p_first, -1), torch.softmax(p_after[cond], -1)
    small, _ = empirical(make_tree, p_first, p_after, 150, seed=2, cond=cond)
    large, second = empirical(make_tree, p_first, p_after, 1500, seed=3, cond=cond)
    assert tv(large, target_first) < tv(small, target_first) + 0.01
    assert tv(large, target_first) < 0.06
    assert tv(second, target_second) < 0.12
    references = [torch.softmax(torch.randn(vocab) * 1.5, -1) for _ in range(20)]
    assert tv(large, target_first) < 0.3 * min(tv(large, r) for r in references)


def test_tree_sampling_with_top_k_and_top_p_matches_the_processed_target():
    torch.manual_seed(4)
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.8)
    vocab = 10
    tree = random_tree(vocab, None, make_generator(3), branching=4, depth=2, expand=1.0)
    p_first, p_after = torch.randn(vocab) * 2, torch.randn(vocab, vocab) * 2
    target = logits_to_probs(p_first[None], params)[0]
    got, _ = empirical(lambda _: tree, p_first, p_after, 2500, seed=5, params=params)
    assert tv(got, target) < 0.04
    assert float(got[target == 0].sum()) == 0.0  # filtered tokens never appear


def test_a_chain_as_a_tree_accepts_like_verify_block():
    """A chain with its q is a tree of single children: greedy verdicts agree with verify_block."""
    from specserve.sampling import verify_block

    torch.manual_seed(6)
    for _ in range(50):
        logits = torch.randn(5, 7)
        draft = torch.randint(0, 7, (4,)).tolist()
        draft[:2] = logits[:2].argmax(-1).tolist()
        a = verify_block(logits, draft, None, GREEDY, None)
        b = verify_tree(logits, DraftTree.chain(draft), GREEDY, None)
        assert (a.tokens, a.num_accepted) == (b.tokens, b.num_accepted)

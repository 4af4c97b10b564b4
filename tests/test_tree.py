"""Token trees: building and pruning, the tree attention mask, verification in one pass with the
cache kept to the accepted path, drafters' trees, greedy exactness through the engine (tiny models
and the real SmolLM2, SDPA and eager attention), the sampled distribution, and bad settings."""

from __future__ import annotations

import itertools

import pytest
import torch
from distribution import chi_square_p_value, sample_outcomes, shifted, two_token_distribution
from transformers import DynamicCache

from specserve.cli import main
from specserve.config import DrafterConfig, SamplingParams, TreeConfig
from specserve.drafters import make_drafter
from specserve.drafters.ngram import NgramDrafter, lookup, ngram_tree
from specserve.drafters.tree import AdaptiveTreeBudget, TreeDrafter
from specserve.engine import SpecEngine
from specserve.errors import SpecServeError
from specserve.target import StepRequest, TreeStepRequest, Verifier
from specserve.tree import (
    ROOT,
    DraftTree,
    flatten,
    prune,
    tree_from_paths,
    tree_from_position_probs,
)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 1, 2, 3, 6, 7,",
    "Hello",
]


def example_tree() -> DraftTree:
    """root -> 5 (-> 7 -> 9), root -> 6 (-> 8)."""
    tree = DraftTree()
    a = tree.add(5, ROOT, 0.5)
    b = tree.add(6, ROOT, 0.3)
    c = tree.add(7, a, 0.5)
    tree.add(8, b, 0.5)
    tree.add(9, c, 0.5)
    return tree


# ---------------------------------------------------------------- building and pruning


def test_tree_paths_depths_and_path_probabilities():
    tree = example_tree()
    assert tree.depths == [1, 1, 2, 2, 3]
    assert tree.path(4) == [0, 2, 4] and tree.children(ROOT) == [0, 1]
    assert tree.path_probs == pytest.approx([0.5, 0.3, 0.25, 0.15, 0.125])
    assert tree.token_ids == [5, 7, 9] and tree.depth == 3


def test_prune_keeps_the_most_probable_paths_within_every_limit():
    tree = example_tree()
    two = prune(tree, TreeConfig(max_nodes=2))
    assert two.tokens == [5, 6] and two.parents == [ROOT, ROOT]
    three = prune(tree, TreeConfig(max_nodes=3))
    assert three.tokens == [5, 6, 7] and three.parents == [ROOT, ROOT, 0]
    narrow = prune(tree, TreeConfig(max_nodes=10, branching=1))
    assert narrow.tokens == [5, 7, 9]
    shallow = prune(tree, TreeConfig(max_nodes=10, max_depth=2))
    assert sorted(shallow.tokens) == [5, 6, 7, 8]
    likely = prune(tree, TreeConfig(max_nodes=10, min_path_prob=0.2))
    assert likely.tokens == [5, 6, 7]
    for t in (two, three, narrow, shallow, likely):
        t.check()


def test_tree_from_paths_merges_shared_prefixes_into_a_trie():
    tree = tree_from_paths([[1, 2, 3], [1, 2, 4], [5]], [2.0, 1.0, 1.0])
    assert tree.tokens == [1, 2, 3, 4, 5]
    assert tree.parents == [ROOT, 0, 1, 1, ROOT]
    assert tree.path_probs == pytest.approx([0.75, 0.75, 0.5, 0.25, 0.25])


def test_lattice_tree_holds_exactly_the_most_probable_paths():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 12) * 2, -1)  # [k, vocab]
    cfg = TreeConfig(max_nodes=9, branching=3)
    tree = tree_from_position_probs(probs, cfg)
    tree.check()
    assert len(tree) == 9
    # Brute force: the path probability of every prefix of every path through the top-3 lattice.
    top = torch.topk(probs, 3, -1).indices.tolist()
    prefixes = {}
    for depth in (1, 2, 3):
        for combo in itertools.product(*top[:depth]):
            prefixes[combo] = float(torch.prod(probs[torch.arange(depth), torch.tensor(combo)]))
    best = sorted(prefixes.values(), reverse=True)[:9]
    assert sorted(tree.path_probs, reverse=True) == pytest.approx(best)


def test_truncating_a_tree_drops_the_nodes_below_k():
    tree = example_tree().truncated(2)
    assert sorted(tree.depths) == [1, 1, 2, 2] and tree.token_ids == [5, 7]


def test_adaptive_budget_shrinks_while_branches_add_nothing_probes_and_grows_back():
    budget = AdaptiveTreeBudget(TreeConfig(max_nodes=32), probe_every=4)
    assert budget.budget(6).max_nodes == 32
    for _ in range(6):
        budget.update(5, 5)  # high acceptance, all of it on the main path: the branches add nothing
    chain = budget.budget(6)
    assert (chain.max_nodes, chain.max_depth, chain.branching) == (6, 6, 1)  # down to the chain itself
    # At a chain's budget every probe_every-th step drafts the full tree.
    assert [(b.max_nodes, b.branching) for b in (budget.budget(6) for _ in range(4))] == [(6, 1), (6, 1), (32, 3),
                                                                                          (6, 1)]
    for _ in range(12):
        budget.update(1, 0)  # low acceptance, but all of it from branches: the tree pays
    assert budget.budget(6).max_nodes == 32
    fixed = AdaptiveTreeBudget(TreeConfig(max_nodes=32, adaptive=False))
    for _ in range(6):
        fixed.update(5, 5)
    assert [fixed.budget(6).max_nodes for _ in range(8)] == [32] * 8


def test_a_shrunk_budget_drafts_the_chain_itself():
    """Once branches have not paid and the budget is below the depth, the tree drafter proposes exactly the
    chain its drafter would (one child per node, so it is verified as a chain), not a smaller bushy tree."""
    prompt = [1, 2, 3, 9, 7, 6, 1, 2, 4, 8, 5, 1, 2]
    tree_drafter = TreeDrafter(NgramDrafter(), TreeConfig(max_nodes=4))
    tree_drafter.start("s", prompt, SamplingParams())
    assert not tree_drafter.propose("s", prompt, 3).is_chain  # a spare node: the other match's token
    budget = tree_drafter.budgets["s"]
    while budget.max_nodes >= 3:
        budget.update(3, 3)  # the branches added nothing
    tree = tree_drafter.propose("s", prompt, 3)
    assert tree.is_chain and tree.tokens == NgramDrafter().propose("s", prompt, 3).token_ids == [4, 8, 5]


def test_tree_drafter_scores_its_branches_against_the_main_path():
    """Commit feeds the budget the tree's accepted tokens and its main path's: a branch hit is a gain."""
    tree_drafter = TreeDrafter(NgramDrafter(), TreeConfig(max_nodes=8))
    prompt = [1, 2, 3, 9, 1, 2, 4, 8, 1, 2]
    tree_drafter.start("s", prompt, SamplingParams())
    tree = tree_drafter.propose("s", prompt, 3)
    assert tree.main_path_tokens() == [4, 8, 1]  # the most recent match is the chain
    assert sorted(tree.tokens[i] for i in tree.children(ROOT)) == [3, 4]
    budget = tree_drafter.budgets["s"]
    before = budget.gain
    tree_drafter.commit("s", prompt + [3, 9, 7])  # the branch [3, 9] accepted, the main path's 4 not
    assert budget.gain == pytest.approx(budget.decay * before + (1 - budget.decay) * 2)


# ---------------------------------------------------------------- the mask and one-pass verification


def prefilled(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache


def test_one_tree_pass_gives_each_path_its_own_logits(tiny_target, attn):
    model, prefix, tree = tiny_target.model, list(range(100, 120)), example_tree()
    ids, mask, positions = flatten(tree, prefix[-1], len(prefix) - 1, torch.float32)
    assert mask.shape == (1, 1, 6, 25) and positions.tolist() == [[19, 20, 20, 21, 21, 22]]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=positions,
                    past_key_values=prefilled(model, prefix[:-1]), use_cache=True).logits[0]  # [6, vocab]
        for node in range(len(tree)):
            path = [tree.tokens[i] for i in tree.path(node)]
            alone = model(input_ids=torch.tensor([prefix + path])).logits[0, -1]
            torch.testing.assert_close(out[node + 1], alone, atol=1e-4, rtol=1e-4)


def test_a_bool_tree_mask_is_silently_wrong_in_eager_attention(tiny_target):
    """Why the mask is additive: eager attention adds the mask to the scores, so True/False adds
    1/0 and hides nothing (checked on the installed transformers)."""
    model, prefix, tree = tiny_target.model, list(range(100, 120)), example_tree()
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids, mask, positions = flatten(tree, prefix[-1], len(prefix) - 1, torch.float32)
        with torch.inference_mode():
            wrong = model(input_ids=torch.tensor([ids]), attention_mask=mask == 0, position_ids=positions,
                          past_key_values=prefilled(model, prefix[:-1]), use_cache=True).logits[0]
            alone = model(input_ids=torch.tensor([prefix + [6]])).logits[0, -1]
        assert (wrong[2] - alone).abs().max() > 1e-3
    finally:
        model.set_attn_implementation(before)


def test_tree_pass_keeps_only_the_accepted_path_in_the_cache(tiny_target, attn):
    """After a tree step the cache equals the cache of the committed tokens fed in order."""
    prompt = tiny_target.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=8)
    verifier = Verifier(tiny_target)
    verifier.add("s", prompt, params)
    with torch.inference_mode():
        first = tiny_target.model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item()
        second = tiny_target.model(input_ids=torch.tensor([prompt + [first]])).logits[0, -1].argmax().item()
    tree = DraftTree()
    tree.add(11, ROOT, 0.6)  # a wrong first branch, so the kept path is not a prefix of the inputs
    a = tree.add(first, ROOT, 0.4)
    tree.add(12, a, 0.5)
    tree.add(second, a, 0.5)
    result = verifier.verify([TreeStepRequest("s", prompt[-1], tree)])[0]
    assert result.verdict.path == [1, 3] and result.verdict.tokens[:2] == [first, second]
    committed = prompt + result.verdict.tokens
    state = verifier.states["s"]
    assert state.num_cached == len(committed) - 1
    reference = prefilled(tiny_target.model, committed[:-1])
    for mine, ref in zip(state.cache.layers, reference.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-5)
    # And the next ordinary step continues exactly as plain decoding would.
    nxt = verifier.verify([StepRequest("s", committed[-1], [])])[0]
    with torch.inference_mode():
        want = tiny_target.model(input_ids=torch.tensor([committed])).logits[0, -1].argmax().item()
    assert nxt.verdict.tokens == [want]


def test_tree_pass_returns_target_features_of_the_kept_inputs(tiny_target):
    prompt = tiny_target.tokenizer.encode(PROMPTS[3])
    verifier = Verifier(tiny_target, hidden_layers=(0, 1))
    verifier.add("s", prompt, SamplingParams())
    tree = DraftTree()
    tree.add(11, ROOT, 0.6)
    result = verifier.verify([TreeStepRequest("s", prompt[-1], tree)])[0]
    kept = result.verdict.num_accepted + 1
    assert result.hidden.shape == (kept, 2 * tiny_target.model.config.hidden_size)


# ---------------------------------------------------------------- drafters' trees


def test_ngram_tree_holds_the_chain_and_other_matches():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 5, 6, 1, 2]
    tree = ngram_tree(tokens, TreeConfig(max_nodes=8, max_depth=3), 1, 4)
    tree.check()
    chain = lookup(tokens, 3, 1, 4)
    assert tree.token_ids == chain  # the chain is the most probable path
    assert {tree.tokens[i] for i in tree.children(ROOT)} >= {5, 4, 3}


def test_draft_model_tree_expands_the_most_probable_nodes(tiny_target, tiny_draft_dir):
    engine = engine_for(tiny_target, "draft_model", 4, tree_nodes=12, path=str(tiny_draft_dir))
    drafter = engine.drafter.inner
    prompt = tiny_target.tokenizer.encode(PROMPTS[0])
    drafter.start("s", prompt, SamplingParams())
    # Each level expands the 3 most probable nodes into 3 children each: 3 + 9 + 9 + 9 candidates.
    full = drafter.propose_tree("s", prompt, TreeConfig(max_nodes=64, branching=3, max_depth=4))
    full.check()
    assert len(full) == 30 and full.depth == 4 and len(full.children(ROOT)) == 3
    tree = drafter.propose_tree("s", prompt, TreeConfig(max_nodes=12, branching=3, max_depth=4))
    assert sorted(tree.path_probs, reverse=True) == pytest.approx(sorted(full.path_probs, reverse=True)[:12])
    assert len(drafter.states["s"].cache.layers[0].keys[0, 0]) == len(prompt)  # tree entries cropped
    chain = drafter.propose("s", prompt, 1).token_ids
    assert tree.tokens[tree.children(ROOT)[0]] == chain[0]  # the greedy token is the first child


# ---------------------------------------------------------------- exactness through the engine


def engine_for(target, kind: str, k: int, *, tree_nodes: int = 16, branching: int = 3, path: str | None = None,
               adaptive: bool = False) -> SpecEngine:
    cfg = DrafterConfig(kind=kind, num_speculative_tokens=k, adaptive_k=adaptive, path=path,
                        tree=TreeConfig(max_nodes=tree_nodes, branching=branching))
    return SpecEngine(target, make_drafter(cfg, target), cfg)


def plain(target, prompt, params) -> list[int]:
    return engine_for(target, "none", 0, tree_nodes=0).generate(prompt, params).token_ids


@pytest.fixture(scope="module")
def plain_outputs():
    """Plain greedy outputs by (attention implementation, prompt), computed once."""
    return {}


@pytest.mark.parametrize("kind", ["ngram", "draft_model", "draft_model_self"])
def test_greedy_tree_output_equals_plain_greedy(tiny_target, tiny_dir, tiny_draft_dir, attn, plain_outputs, kind):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    path = {"draft_model": str(tiny_draft_dir), "draft_model_self": str(tiny_dir)}.get(kind)
    real_kind = "draft_model" if path else kind
    configs = [(4, 12, False), (6, 24, True)] if kind == "ngram" else [(4, 12, True)]
    for k, nodes, adaptive in configs:
        engine = engine_for(tiny_target, real_kind, k, tree_nodes=nodes, path=path, adaptive=adaptive)
        for prompt in PROMPTS[1:] if kind == "ngram" else PROMPTS[1:3]:
            if (attn, prompt) not in plain_outputs:
                plain_outputs[(attn, prompt)] = plain(tiny_target, prompt, params)
            got = engine.generate(prompt, params)
            assert got.token_ids == plain_outputs[(attn, prompt)], (kind, k, prompt)
            if kind == "draft_model_self":  # the greedy path is in the tree more often than not
                assert got.stats.mean_accepted_length > 2.0


def test_ngram_tree_accepts_at_least_what_the_chain_accepts_at_every_step():
    """The lookup chain is the tree's most probable path, so from the same state the tree never
    accepts less; on repetitive text it often accepts more."""
    from specserve.sampling import verify_tree

    text = "the cat sat on the mat . the cat ran to the hat . the dog sat on the cat . the cat sat on the hat ."
    tokens = [hash(w) % 1000 for w in text.split()]
    more = 0
    for pos in range(4, len(tokens) - 1):
        seq, truth = tokens[:pos], tokens[pos:]
        chain = lookup(seq, 4, 1, 4)
        n_chain = next((i for i, (a, b) in enumerate(zip(chain, truth)) if a != b), min(len(chain), len(truth)))
        tree = ngram_tree(seq, TreeConfig(max_nodes=12, max_depth=4), 1, 4)
        logits = torch.full((len(tree) + 1, 1000), -1.0)
        for row, path in enumerate([[]] + [tree.path(i) for i in range(len(tree))]):
            if len(path) < len(truth):  # the target's argmax after this path is the true next token
                logits[row, truth[len(path)]] = 1.0 if all(tree.tokens[n] == truth[j] for j, n in enumerate(path)) else -1.0
        n_tree = verify_tree(logits, tree, SamplingParams(), None).num_accepted
        assert n_tree >= n_chain, (pos, n_tree, n_chain)
        more += n_tree > n_chain
    assert more > 0


def test_greedy_tree_output_equals_plain_greedy_on_the_real_model(real_target):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"
    for impl in ("sdpa", "eager"):
        real_target.model.set_attn_implementation(impl)
        try:
            expected = plain(real_target, prompt, params)
            got = engine_for(real_target, "ngram", 5, tree_nodes=16).generate(prompt, params)
            assert got.token_ids == expected, impl
            assert got.stats.num_drafts > 0
        finally:
            real_target.model.set_attn_implementation("sdpa")


def test_real_model_drafting_for_itself_with_a_tree_accepts_everything(real_target, default_dir):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = engine_for(real_target, "draft_model", 2, tree_nodes=4, branching=2, path=str(default_dir))
    got = engine.generate("The capital of France is", params)
    assert got.token_ids == plain(real_target, "The capital of France is", params)
    assert got.stats.acceptance_rate == 1.0


# ---------------------------------------------------------------- sampling through the engine


@pytest.mark.parametrize("kind", ["ngram", "draft_model"])
def test_tree_sampling_preserves_the_target_distribution(tiny_target, tiny_draft_dir, kind):
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    # " cat" was followed by three different words: n-gram lookup has three matches to branch on.
    prompt_ids = tiny_target.tokenizer.encode("cat dog cat fish cat bird cat")
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    engine = engine_for(tiny_target, kind, 3, tree_nodes=9,
                        path=str(tiny_draft_dir) if kind == "draft_model" else None)
    n = 300
    nodes_before = engine.drafter.num_nodes
    counts, _ = sample_outcomes(engine, prompt_ids, params, n)
    assert engine.drafter.num_nodes - nodes_before > n, "the trees must branch for the test to mean anything"
    assert chi_square_p_value(counts, expected, n) > 1e-3, counts
    # The same counts reject a 10% shift of mass between the two likeliest outcomes: the test has power.
    assert chi_square_p_value(counts, shifted(expected, 0.10), n) < 1e-3


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "flags,flag",
    [(["--tree-nodes", "-1"], "--tree-nodes"), (["--tree-nodes", "8", "--tree-branching", "0"], "--tree-branching"),
     (["--tree-nodes", "100000"], "--tree-nodes"), (["--tree-nodes", "8", "--tree-depth", "0"], "--tree-depth")],
    ids=["negative-budget", "branching-0", "budget-above-context", "depth-0"],
)
def test_bad_tree_settings_get_one_line_naming_the_flag(tiny_dir, capsys, flags, flag):
    status = main(["generate", "--model", str(tiny_dir), "--dtype", "fp32", "--drafter", "ngram",
                   "--max-tokens", "2", *flags, "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}"), err


def test_budget_above_the_context_is_refused_in_the_api_too(tiny_target):
    with pytest.raises(SpecServeError) as e:
        engine_for(tiny_target, "ngram", 4, tree_nodes=tiny_target.max_context)
    assert e.value.param == "drafter.tree.max_nodes"


def test_below_re_roots_the_branch_under_a_token_and_keeps_q_rows():
    from specserve.tree import below

    tree = example_tree()  # root -> 5 (-> 7 -> 9), root -> 6 (-> 8); nodes 0..4 = 5, 6, 7, 8, 9
    tree.q = torch.arange(len(tree) + 1, dtype=torch.float32)[:, None].repeat(1, 3)  # row r holds r
    sub = below(tree, 5)
    assert sub.tokens == [7, 9] and sub.parents == [ROOT, 0]
    assert sub.q[:, 0].tolist() == [1, 3, 5]  # node 5's row becomes the root's, then nodes 7 and 9
    assert below(tree, 42) is None
    assert below(tree, 6).tokens == [8]

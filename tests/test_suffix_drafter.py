"""The suffix drafter: its tries against brute-force counts, what it drafts (longest match, frequency,
length, trees, own context against the cache), the bounded cross-request cache under threads, and
exactness through the engine (greedy and sampled, chains and trees, cold and warm cache)."""

from __future__ import annotations

import json
import random
import sys
import threading
from collections import Counter

import pytest
from distribution import chi_square_p_value, sample_outcomes, shifted, two_token_distribution

from specserve.cli import main
from specserve.config import DrafterConfig, SamplingParams, TreeConfig, parse_drafter
from specserve.drafters import make_drafter
from specserve.drafters.suffix import SuffixDrafter, SuffixTrie
from specserve.drafters.tree import TreeDrafter
from specserve.engine import SpecEngine
from specserve.tree import ROOT

GREEDY = SamplingParams()


VOCAB: dict[str, int] = {}


def words(text: str) -> list[int]:
    """Hand-written token sequences: one id per distinct word (the same id in every test)."""
    return [VOCAB.setdefault(w, 1000 + len(VOCAB)) for w in text.split()]


def brute_counts(seqs: list[list[int]], max_depth: int) -> tuple[Counter, dict[tuple, Counter]]:
    """Occurrences of every string of up to ``max_depth`` tokens, and the tokens that followed each."""
    counts, after = Counter(), {}
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + max_depth, len(s)) + 1):
                counts[tuple(s[i:j])] += 1
                if j < len(s) and j - i < max_depth:
                    after.setdefault(tuple(s[i:j]), Counter())[s[j]] += 1
    return counts, after


def assert_trie_counts(trie: SuffixTrie, seqs: list[list[int]]) -> None:
    counts, after = brute_counts(seqs, trie.max_depth)
    for string, n in counts.items():
        assert trie.count(list(string)) == n, string
        assert trie.next_counts(list(string)) == dict(after.get(string, {})), string


def fresh_nodes(seqs: list[list[int]], max_depth: int) -> int:
    trie = SuffixTrie(max_depth)
    for s in seqs:
        trie.insert(s, 0)
    return trie.num_nodes


def drafter_with(text: str, **kw) -> tuple[SuffixDrafter, list[int]]:
    """A drafter that has started one request whose context is ``text``."""
    d = SuffixDrafter(**kw)
    ctx = words(text)
    d.start("r", ctx, GREEDY)
    return d, ctx


def finished(d: SuffixDrafter, seq_id: str, prompt: list[int], output: list[int]) -> None:
    """Run a request through the drafter the way an engine does, ending with ``finish``."""
    d.start(seq_id, prompt, GREEDY)
    d.commit(seq_id, prompt + output)
    d.finish(seq_id)


# ---------------------------------------------------------------- the trie


def test_counts_say_how_often_each_token_followed_a_string():
    trie = SuffixTrie(max_depth=4)
    a, b, c, d = 1, 2, 3, 4
    trie.insert([a, b, c, a, b, d, a, b, c], stamp=1)
    assert trie.count([a, b]) == 3
    assert trie.next_counts([a, b]) == {c: 2, d: 1}
    assert trie.count([a, b, c]) == 2 and trie.next_counts([a, b, c]) == {a: 1}  # the last one ends the text
    assert trie.count([b, d, a, b]) == 1 and trie.next_counts([b, d, a, b]) == {}  # depth 4 is the window's end
    assert trie.count([d, a, b, c, a]) == 0  # longer than max_depth: not indexed
    assert trie.count([c, c]) == 0


@pytest.mark.parametrize("alphabet", [1, 2, 4])
def test_trie_equals_brute_force_counts_online_whole_and_after_oldest_first_removal(alphabet):
    rng = random.Random(alphabet)
    for _ in range(60):
        depth = rng.randint(2, 7)
        seqs = [[rng.randrange(alphabet) for _ in range(rng.randint(0, 30))] for _ in range(rng.randint(1, 5))]
        trie = SuffixTrie(depth)
        for s in seqs:
            trie.insert(s, stamp=0)
        assert_trie_counts(trie, seqs)
        gone = rng.randint(0, len(seqs))
        for s in seqs[:gone]:
            trie.remove(s)
        assert_trie_counts(trie, seqs[gone:])
        # Nodes left by shared strings turn lazy again: removal gives the memory back.
        assert trie.num_nodes == fresh_nodes(seqs[gone:], depth)
        # Online, token by token, as a request's own trie grows: the same counts at every length, and the
        # active nodes are the suffixes that occurred before (by depth, up to the longest).
        online, grown, active = SuffixTrie(depth), [], []
        for t in seqs[-1]:
            grown.append(t)
            active = online.extend(grown, len(grown) - 1, active, len(grown))
            assert_trie_counts(online, [grown])
            counts, _ = brute_counts([grown], depth)
            longest = next((n for n in range(min(depth - 1, len(grown)), 0, -1) if counts[tuple(grown[-n:])] > 1), 0)
            assert [node.depth for node in active] == list(range(1, longest + 1))


def test_matches_are_every_earlier_suffix_by_depth_up_to_the_longest():
    trie = SuffixTrie(max_depth=8)
    trie.insert(words("x a b c d e"), stamp=1)
    ctx = words("x a b c d e")[1:4] + [99]  # "a b c" then an unseen token
    assert trie.matches(ctx) == []
    ctx = [99] + words("x a b c d e")[1:4]  # ends in "a b c"
    found = trie.matches(ctx)
    assert [trie.depth(c) for c in found] == [1, 2, 3]
    assert [t for t, _, _, _ in trie.continuations(found[-1])] == [words("x a b c d e")[4]]


def test_a_thousand_requests_stay_under_the_cache_caps_and_match_a_fresh_trie():
    rng = random.Random(0)
    phrases = [[rng.randrange(50) for _ in range(rng.randint(3, 12))] for _ in range(30)]
    d = SuffixDrafter(max_depth=16, cache_requests=40, cache_tokens=3000)
    for i in range(1000):
        output = [t for _ in range(rng.randint(2, 8)) for t in rng.choice(phrases)]
        finished(d, f"r{i}", [1, 2, 3], output)
        assert d.cache.num_tokens <= 3000 and len(d.cache.sequences) <= 40
        if i % 100 == 99:  # eviction leaves no nodes behind: the trie is what its sequences alone build
            assert d.cache.trie.num_nodes == fresh_nodes(list(d.cache.sequences), 16)
    assert d.requests == {}  # finished requests leave no per-request state behind
    assert d.cache.num_tokens == sum(map(len, d.cache.sequences))


# ---------------------------------------------------------------- what it drafts


def test_drafts_what_followed_the_longest_match_not_the_most_frequent_short_one():
    # "b" was followed by "z" three times, but "x a b" by "y" once: the longer context wins.
    d, ctx = drafter_with("b z b z b z x a b y q x a b")
    assert d.propose("r", ctx, 1).token_ids == words("y")


def test_equal_matches_draft_the_more_frequent_continuation_then_the_latest():
    d, ctx = drafter_with("a b c a b c a b d a b")
    assert d.propose("r", ctx, 1).token_ids == words("c")  # c twice, d once
    d, ctx = drafter_with("a b c a b d a b")
    assert d.propose("r", ctx, 1).token_ids == words("d")  # once each: the latest


def test_draft_length_follows_the_match_length_and_short_matches_draft_nothing():
    passage = list(range(200, 216))
    # The cache: nothing below min_match (2) matched tokens, then spec_factor (2) draft tokens per matched token.
    d = SuffixDrafter()
    finished(d, "old", [], passage)
    for matched, expected in [(1, 0), (2, 4), (3, 6), (14, 2)]:  # (14: the cached text ends)
        ctx = [7, 8] + passage[:matched]
        d.start(f"r{matched}", ctx, GREEDY)
        assert len(d.propose(f"r{matched}", ctx, 6).token_ids) == expected, matched
    # The own text: the same rule with its own knobs.
    for matched, expected in [(1, 0), (2, 2), (3, 3), (7, 6)]:
        d = SuffixDrafter(own_min_match=2, own_spec_factor=1.0)
        ctx = passage + passage[:matched]
        d.start("r", ctx, GREEDY)
        assert len(d.propose("r", ctx, 6).token_ids) == expected, matched
    # A match longer than the tries index still drafts k tokens, from a shorter suffix of the match.
    long = list(range(100, 130))
    d = SuffixDrafter(max_depth=8)
    d.start("r", long + long[:20], GREEDY)
    assert d.propose("r", long + long[:20], 6).token_ids == long[20:26]


def test_tree_branches_where_the_counts_disagree_and_prunes_rare_continuations():
    # The longest match is "the cat" (the words before it differ), followed by sat x3, ran x2, hid x1;
    # hid's share of 1/6 is below min_prob.
    text = "A the cat sat . B the cat ran . C the cat sat . D the cat hid . E the cat sat . F the cat ran . G the cat"
    d, ctx = drafter_with(text, min_match=2, min_prob=0.2)
    tree = d.propose_tree("r", ctx, TreeConfig(max_nodes=8, max_depth=2, branching=3))
    tree.check()
    sat, ran, dot = words("sat ran .")
    assert {tree.tokens[i]: tree.node_probs[i] for i in tree.children(ROOT)} == {sat: 0.5, ran: pytest.approx(1 / 3)}
    assert sorted(tree.tokens) == sorted([sat, ran, dot, dot])  # each branch continues with "."
    assert tree.main_path_tokens() == [sat, dot]
    assert tree.q is None  # deterministic proposals
    chain = d.propose("r", ctx, 2).token_ids
    assert chain == tree.main_path_tokens()


def test_the_cache_learns_from_a_finished_request():
    d = SuffixDrafter(min_match=2)
    prompt, output = words("tell me a story"), words("once upon a time there was a fox")
    other = words("please tell another story :")
    d.start("new", other, GREEDY)
    assert d.propose("new", other + output[:2], 8).token_ids == []
    finished(d, "old", prompt, output)
    assert d.cache.num_tokens == len(output)  # the output only: prompts stay private by default
    assert d.propose("new", other + output[:2], 8).token_ids == output[2:6]  # two tokens matched: four drafted
    assert d.propose("new", other + output[:4], 8).token_ids == output[4:8]  # up to the cached text's end


def test_a_tenants_requests_read_and_feed_only_that_tenants_cache():
    d = SuffixDrafter(min_match=2, cache_requests=3)
    prompt, output = words("tell me a story"), words("once upon a time there was a fox")
    other = words("please tell another story :")
    alice, bob = (GREEDY.model_copy(update={"cache_tenant": t}) for t in ("alice", "bob"))

    def drafts(seq_id: str, params: SamplingParams) -> list[int]:
        d.start(seq_id, other, params)
        got = d.propose(seq_id, other + output[:2], 8).token_ids
        d.finish(seq_id)
        return got

    d.start("a", prompt, alice)
    d.commit("a", prompt + output)
    d.finish("a")
    assert drafts("a2", alice) == output[2:6]  # alice's own answer, from her cache
    assert drafts("b", bob) == []  # bob sees none of alice's text
    assert drafts("shared", GREEDY) == []  # nor do requests without a tenant
    # The shared cache holds the tenant-less request's own two tokens, nothing of alice's.
    assert d.cache.num_tokens == 2 and d.stats()["tenant_caches"] == 2
    # Each tenant's cache has the shared one's caps: bob's requests evict only bob's.
    for i in range(4):
        finished(d, f"b{i}", [], [100 + i, 200 + i])
    assert len(d.tenant_caches["bob"].sequences) == 1 and len(d.cache.sequences) == 3  # tenant-less: shared
    for i in range(4):
        d.start(f"b{i}", [], bob)
        d.commit(f"b{i}", [100 + i, 200 + i])
        d.finish(f"b{i}")
    assert len(d.tenant_caches["bob"].sequences) == 3 and d.tenant_caches["alice"].sequences
    assert drafts("a3", alice) == output[2:6]


def test_a_sharing_drafter_hands_its_finished_outputs_to_another_replicas_drafter_per_tenant():
    here, there = SuffixDrafter(min_match=2), SuffixDrafter(min_match=2)
    here.share()
    prompt, output = words("tell me a story"), words("once upon a time there was a fox")
    other = words("please tell another story :")
    alice = GREEDY.model_copy(update={"cache_tenant": "alice"})
    finished(here, "r1", prompt, output)
    here.start("r2", prompt, alice)
    here.commit("r2", prompt + output[:4])
    here.finish("r2")
    sent = here.take_outbox()
    assert sent == [(None, output), ("alice", output[:4])] and here.take_outbox() == []
    assert SuffixDrafter().take_outbox() == []  # a drafter that does not share keeps no outbox
    for tenant, tokens in sent:
        there.learn(tenant, tokens)
    there.start("new", other, GREEDY)
    assert there.propose("new", other + output[:2], 8).token_ids == output[2:6]  # from the other replica
    assert there.cache.num_tokens == len(output) and there.tenant_caches["alice"].num_tokens == 4


def test_a_long_match_in_the_own_context_keeps_the_lead_over_the_cache():
    d = SuffixDrafter(min_match=2, own_weight=2.0)  # own matched tokens weigh twice the cache's
    for i in range(5):  # the cache saw "def f ( x ) : return x" five times
        finished(d, f"c{i}", [], words("def f ( x ) : return x + 1 ; def g ( x ) : return x + 1"))
    # The request's own text matches "def f ( x ) : return" as long as the cache does, and goes on with y.
    own = words("def f ( x ) : return y + 2 ; def f ( x ) : return")
    d.start("r", own, GREEDY)
    assert d.propose("r", own, 1).token_ids == words("y")
    # A short own match (": return", 2 tokens) against the cache's 7: the cache leads.
    own = words(": return y ; z def f ( x ) : return")
    d.start("s", own, GREEDY)
    assert d.propose("s", own, 1).token_ids == words("x")


def test_a_rolled_back_history_drafts_from_the_history_given():
    d, ctx = drafter_with("a b c d a b c d a b")
    assert d.propose("r", ctx, 2).token_ids == words("a b c d")[2:4]
    branch = ctx[:-1] + [77, 78, 79, 77, 78]  # the last token replaced: the trie is rebuilt from this history
    d.commit("r", branch)
    assert d.propose("r", branch, 1).token_ids == [79]


def test_cache_eviction_drops_the_oldest_requests_first():
    d = SuffixDrafter(min_match=2, cache_requests=2)
    for i in range(3):
        finished(d, f"r{i}", [], [100 + i, 200 + i, 300 + i])
    assert [s[0] for s in d.cache.sequences] == [101, 102]
    d.start("q", [100, 200], GREEDY)
    assert d.propose("q", [100, 200], 1).token_ids == []  # r0 is gone
    d.start("q2", [102, 202], GREEDY)
    assert d.propose("q2", [102, 202], 1).token_ids == [302]
    d = SuffixDrafter(cache_tokens=5)
    for i in range(3):
        finished(d, f"r{i}", [], [i] * 3)
    assert d.cache.num_tokens <= 5 and len(d.cache.sequences) == 1
    d = SuffixDrafter(cache_requests=0)  # no cross-request cache
    finished(d, "r", [], [1, 2, 3])
    assert d.cache.num_tokens == 0 and d.cache.trie.num_nodes == 1


def test_requests_in_several_threads_share_the_cache_safely():
    """Eight threads run requests (start, commit, propose, propose_tree, finish) against one drafter while
    the cache evicts; afterwards the cache's trie equals one built from its sequences."""
    d = SuffixDrafter(max_depth=12, min_match=1, cache_requests=25)
    rng = random.Random(1)
    phrases = [[rng.randrange(30) for _ in range(6)] for _ in range(8)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        r = random.Random(w)
        try:
            for i in range(30):
                seq_id, prompt = f"w{w}-{i}", r.choice(phrases)[:3]
                out = [t for _ in range(4) for t in r.choice(phrases)]
                d.start(seq_id, prompt, GREEDY)
                for n in range(0, len(out), 3):
                    d.commit(seq_id, prompt + out[:n])
                    d.propose(seq_id, prompt + out[:n], 4)
                    d.propose_tree(seq_id, prompt + out[:n], TreeConfig(max_nodes=6, max_depth=3))
                d.commit(seq_id, prompt + out)
                d.finish(seq_id)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    seqs = list(d.cache.sequences)
    assert len(seqs) == 25 and d.cache.num_tokens == sum(map(len, seqs))
    assert_trie_counts(d.cache.trie, seqs)
    assert d.cache.trie.num_nodes == fresh_nodes(seqs, 12)


# ---------------------------------------------------------------- config and CLI


def test_suffix_is_built_from_its_spec_with_its_knobs():
    cfg = parse_drafter("suffix", num_speculative_tokens=5)
    cfg = cfg.model_copy(update={"suffix_min_match": 3, "suffix_cache_requests": 7, "suffix_max_depth": 20})
    d = make_drafter(cfg, None)
    assert isinstance(d, SuffixDrafter)
    assert (d.cache_rule.min_match, d.cache.max_requests, d.max_depth) == (3, 7, 20)
    tree = make_drafter(cfg.model_copy(update={"tree": TreeConfig(max_nodes=8)}), None)
    assert isinstance(tree, TreeDrafter) and isinstance(tree.inner, SuffixDrafter)


def test_generate_runs_with_drafter_suffix_from_the_cli(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--dtype", "fp32", "--max-tokens", "12", "--ignore-eos",
            "--json", "a b c a b c a b"]
    assert main(args + ["--drafter", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--drafter", "suffix"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == plain["token_ids"] and len(got["token_ids"]) == 12


# ---------------------------------------------------------------- exactness through the engine


PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
    "Hello",
    "Once upon a time there was a little robot who wanted to learn how to paint the sky.",
]


def suffix_engine(target, k: int, *, adaptive: bool = False, tree_nodes: int = 0, **knobs) -> SpecEngine:
    cfg = DrafterConfig(kind="suffix", num_speculative_tokens=k, adaptive_k=adaptive,
                        tree=TreeConfig(max_nodes=tree_nodes), **knobs)
    return SpecEngine(target, make_drafter(cfg, target), cfg)


@pytest.fixture(scope="module")
def plain_outputs(tiny_target):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    engine = SpecEngine(tiny_target, make_drafter(cfg, tiny_target), cfg)
    return {p: engine.generate(p, params).token_ids for p in PROMPTS}


@pytest.mark.parametrize("k,adaptive,tree_nodes", [(1, False, 0), (3, False, 0), (8, False, 0), (6, True, 0),
                                                   (4, False, 12), (6, True, 24)],
                         ids=["k1", "k3", "k8", "adaptive-k6", "tree12-k4", "adaptive-tree24-k6"])
def test_greedy_output_equals_plain_greedy_with_the_cache_cold_and_warm(tiny_target, plain_outputs, k, adaptive,
                                                                        tree_nodes):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine = suffix_engine(tiny_target, k, adaptive=adaptive, tree_nodes=tree_nodes)
    for round_ in ("cold", "warm"):  # the second round finds every output in the cache
        accepted = []
        for prompt in PROMPTS:
            got = engine.generate(prompt, params)
            assert got.token_ids == plain_outputs[prompt], (round_, prompt)
            accepted.append(got.stats.mean_accepted_length)
        if round_ == "warm" and k > 1:
            assert min(accepted) > 2.0, accepted  # the cache drafts the repeated answers


def test_greedy_output_equals_plain_greedy_on_the_real_model_with_a_warm_cache(real_target):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    messages = [{"role": "user", "content": "Name three colours."}]
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    plain = SpecEngine(real_target, make_drafter(cfg, real_target), cfg).generate(messages, params, chat=True)
    for tree_nodes in (0, 16):
        engine = suffix_engine(real_target, 6, tree_nodes=tree_nodes)
        cold = engine.generate(messages, params, chat=True)
        warm = engine.generate(messages, params, chat=True)
        assert cold.token_ids == warm.token_ids == plain.token_ids, tree_nodes
        assert warm.stats.mean_accepted_length > 3.0  # the first answer, from the cache


@pytest.mark.parametrize("tree_nodes", [0, 9], ids=["chain", "tree"])
def test_sampling_preserves_the_target_distribution(tiny_target, tree_nodes):
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    # " cat" was followed by three different words: with single-token matches the tree branches there;
    # the cache fills with the sampled outputs as the test runs, so later steps draft from it too.
    prompt_ids = tiny_target.tokenizer.encode("cat dog cat fish cat bird cat")
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    engine = suffix_engine(tiny_target, 3, tree_nodes=tree_nodes, suffix_min_match=1, suffix_min_prob=0.0)
    n = 300
    nodes_before = engine.drafter.num_nodes if tree_nodes else 0
    counts, stats = sample_outcomes(engine, prompt_ids, params, n)
    assert stats.num_draft_tokens > 0, "the drafter never proposed: the test would not exercise acceptance"
    if tree_nodes:
        assert engine.drafter.num_nodes - nodes_before > n, "the trees must branch for the test to mean anything"
    assert chi_square_p_value(counts, expected, n) > 1e-3, counts
    # The same counts reject a 10% shift of mass between the two likeliest outcomes: the test has power.
    assert chi_square_p_value(counts, shifted(expected, 0.10), n) < 1e-3

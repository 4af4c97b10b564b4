"""The hybrid drafter: per-step choice between n-gram lookup and the block drafter, exact and lossless."""

from __future__ import annotations

import pytest
import torch
from distribution import (
    assert_drafts_accepted_and_rejected,
    chi_square_p_value,
    sample_outcomes,
    shifted,
    two_token_distribution,
)

from specserve.config import DrafterConfig, SamplingParams, parse_drafter
from specserve.drafters import make_drafter
from specserve.drafters.block import BlockDrafter, BlockDrafterConfig, build_model, save_checkpoint
from specserve.drafters.hybrid import HybridDrafter, _SeqState, _Source
from specserve.engine import SpecEngine
from tests.test_block_drafter import plain

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
]
TINY = BlockDrafterConfig(block_size=4, num_layers=1, target_layers=(0, 1), draft_vocab_size=512)


@pytest.fixture(scope="module")
def hybrid(tiny_target) -> HybridDrafter:
    torch.manual_seed(2)
    return HybridDrafter(BlockDrafter(build_model(TINY, tiny_target).eval()))


def engine(target, drafter, k: int = 4, adaptive: bool = False) -> SpecEngine:
    return SpecEngine(target, drafter, DrafterConfig(kind="hybrid", num_speculative_tokens=k, adaptive_k=adaptive))


@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (4, True)])
def test_greedy_output_with_hybrid_drafter_equals_plain_greedy(tiny_target, hybrid, k, adaptive):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    before = dict(hybrid.counts)
    for prompt in PROMPTS:
        assert engine(tiny_target, hybrid, k, adaptive).generate(prompt, params).token_ids == \
            plain(tiny_target, prompt, params), prompt
    used = {s: hybrid.counts[s] - before[s] for s in before}
    assert used["ngram"] > 0 and used["block"] > 0, used
    assert not hybrid.states and not hybrid.block.states, "finished sequences must free their state"


def test_choice_follows_expected_accepted_length_per_cost(hybrid):
    state = _SeqState(_Source(1.0), _Source(1.0))
    assert hybrid.choose(state, has_match=False) == "block"
    assert hybrid.choose(state, has_match=True) == "ngram", "equal acceptance: the free source wins"
    state.block.mean = 4.0
    assert hybrid.choose(state, has_match=True) == "block"
    for _ in range(10):  # the block drafter keeps failing on this sequence: n-gram takes over again
        state.block.update(0, hybrid.decay)
    assert hybrid.choose(state, has_match=True) == "ngram"


def test_commit_scores_the_source_that_drafted(tiny_target, hybrid):
    params = SamplingParams(max_tokens=8)
    ids = tiny_target.tokenizer.encode(PROMPTS[3])
    hybrid.start("s", ids, params)
    state = hybrid.states["s"]
    state.last_source, state.last_draft = "ngram", (5, 6, 7)
    hybrid.commit("s", [5, 6, 9])  # two accepted, then a recovered token
    assert state.ngram.weight == pytest.approx(1.8) and state.ngram.mean == pytest.approx(1.5 + 0.5 / 1.8)
    hybrid.finish("s")


# With max_tokens=2 the only draft is proposed from the prompt: the last "Hello" has an earlier match, so every
# draft is the n-gram source's (block drafts are sampled by the block drafter's own code, whose distribution
# tests are in test_block_drafter.py).
@pytest.mark.timeout(2400)  # 1500 generations: slow when other suites share the 2 cores
def test_sampling_with_hybrid_drafter_preserves_the_target_distribution(tiny_target, hybrid):
    prompt_ids = tiny_target.tokenizer.encode("Hello Hello Hello")
    params = SamplingParams(max_tokens=2, temperature=2.0, top_k=3, ignore_eos=True)
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    n = 1500
    eng = engine(tiny_target, hybrid, 2)
    before = dict(hybrid.counts)
    counts, stats = sample_outcomes(eng, prompt_ids, params, n)
    assert {s: hybrid.counts[s] - before[s] for s in before} == {"ngram": n, "block": 0}
    assert_drafts_accepted_and_rejected(stats)
    assert chi_square_p_value(counts, expected, n) > 1e-3
    assert chi_square_p_value(counts, shifted(expected, 0.07), n) < 1e-3


def test_hybrid_is_built_from_its_spec(tiny_target, hybrid, tmp_path):
    path = save_checkpoint(tmp_path / "d.pt", hybrid.block.model, tiny_target)
    cfg = parse_drafter(f"hybrid:{path}")
    assert cfg.kind == "hybrid" and cfg.path == str(path)
    built = make_drafter(cfg, tiny_target)
    assert isinstance(built, HybridDrafter) and built.target_layers == (0, 1)

"""The generate loop: greedy exactness for every drafter, stop conditions, seeds, edge cases."""

from __future__ import annotations

import pytest
import torch
from distribution import chi_square_p_value, sample_outcomes, shifted, two_token_distribution

from specserve.config import DrafterConfig, SamplingParams, TreeConfig
from specserve.drafters import make_drafter
from specserve.engine import SpecEngine
from specserve.errors import SpecServeError
from specserve.target import StepRequest, Verifier

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
    "Hello",
    "Once upon a time there was a little robot who wanted to learn how to paint the sky.",
]


def engine_for(target, kind: str, k: int, adaptive: bool = False, path: str | None = None) -> SpecEngine:
    cfg = DrafterConfig(kind=kind, num_speculative_tokens=k, adaptive_k=adaptive, path=path)
    return SpecEngine(target, make_drafter(cfg, target), cfg)


def plain(target, prompt, params) -> list[int]:
    return engine_for(target, "none", 0).generate(prompt, params).token_ids


def hf_greedy(target, prompt, max_tokens) -> list[int]:
    ids = torch.tensor([target.tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, pad_token_id=target.tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


DRAFTERS = [("ngram", False), ("draft_model", False), ("draft_model_self", False), ("ngram", True),
            ("draft_model_self", True)]


@pytest.fixture(scope="module")
def drafter_paths(tiny_dir, tiny_draft_dir):
    return {"draft_model": str(tiny_draft_dir), "draft_model_self": str(tiny_dir)}


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind,adaptive", DRAFTERS, ids=lambda v: str(v))
def test_greedy_speculative_output_equals_plain_greedy(tiny_target, drafter_paths, kind, adaptive, k):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    real_kind = "draft_model" if kind.startswith("draft_model") else kind
    engine = engine_for(tiny_target, real_kind, k, adaptive, drafter_paths.get(kind))
    for prompt in PROMPTS:
        expected = plain(tiny_target, prompt, params)
        got = engine.generate(prompt, params)
        assert got.token_ids == expected, (kind, k, prompt)
        assert len(got.token_ids) == 40


def test_plain_decoding_matches_transformers_generate(tiny_target):
    for prompt in PROMPTS[:3]:
        assert plain(tiny_target, prompt, SamplingParams(max_tokens=30, ignore_eos=True)) == hf_greedy(
            tiny_target, prompt, 30)


def test_self_drafting_accepts_every_token(tiny_target, tiny_dir):
    engine = engine_for(tiny_target, "draft_model", 4, path=str(tiny_dir))
    result = engine.generate(PROMPTS[0], SamplingParams(max_tokens=21, ignore_eos=True))
    s = result.stats
    # 21 tokens = 4 full blocks of (4 accepted + bonus) + 1 final step with k capped at 0.
    assert s.num_drafts == 4 and s.num_accepted_tokens == 16
    assert s.mean_accepted_length == 5.0
    assert s.acceptance_by_position() == [1.0, 1.0, 1.0, 1.0]


def test_ngram_drafter_with_no_match_decodes_plainly(tiny_target):
    engine = engine_for(tiny_target, "ngram", 5)
    drafter = engine.drafter
    assert drafter.propose("s", [1, 2, 3, 4], 5).token_ids == []
    prompt_ids = list(range(1000, 1010))  # no repeats: nothing to look up at the start
    result = engine.generate(prompt_ids, SamplingParams(max_tokens=1))
    assert result.stats.num_drafts == 0 and len(result.token_ids) == 1


def test_k_zero_is_plain_decoding(tiny_target):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    result = engine_for(tiny_target, "ngram", 0).generate(PROMPTS[2], params)
    assert result.stats.num_drafts == 0
    assert result.token_ids == plain(tiny_target, PROMPTS[2], params)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_inside_a_block_stops_exactly(tiny_target, tiny_dir, max_tokens):
    engine = engine_for(tiny_target, "draft_model", 8, path=str(tiny_dir))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    result = engine.generate(PROMPTS[1], params)
    assert result.token_ids == plain(tiny_target, PROMPTS[1], params)
    assert len(result.token_ids) == max_tokens and result.finish_reason == "length"


def test_eos_inside_a_block_stops_exactly(tiny_target, tiny_dir):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference = plain(tiny_target, PROMPTS[0], params)
    # Declare the 6th generated token to be EOS: a self-drafted block of 8 must stop right after it.
    fake_eos = reference[5]
    first = reference.index(fake_eos)
    original = tiny_target.model.generation_config.eos_token_id
    tiny_target.model.generation_config.eos_token_id = fake_eos
    try:
        # The engine reads the model's EOS ids once, when it is built.
        engine = engine_for(tiny_target, "draft_model", 8, path=str(tiny_dir))
        result = engine.generate(PROMPTS[0], SamplingParams(max_tokens=30))
    finally:
        tiny_target.model.generation_config.eos_token_id = original
    assert result.token_ids == reference[: first + 1]
    assert result.finish_reason == "stop"


def test_stop_string_inside_a_block_cuts_text_where_plain_decoding_does(tiny_target, tiny_dir):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference = engine_for(tiny_target, "none", 0).generate(PROMPTS[3], params)
    stop = reference.text[10:13]
    assert stop.strip(), "need a visible stop string"
    stopped = SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])
    spec = engine_for(tiny_target, "draft_model", 8, path=str(tiny_dir)).generate(PROMPTS[3], stopped)
    base = engine_for(tiny_target, "none", 0).generate(PROMPTS[3], stopped)
    assert spec.token_ids == base.token_ids
    assert spec.text == base.text == reference.text[: reference.text.find(stop)]
    assert spec.finish_reason == "stop" and len(spec.token_ids) < 30


@pytest.mark.parametrize("kind", ["none", "ngram", "draft_model"])
def test_seeded_sampling_repeats_exactly(tiny_target, tiny_draft_dir, kind):
    engine = engine_for(tiny_target, kind, 4, path=str(tiny_draft_dir) if kind == "draft_model" else None)
    params = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate(PROMPTS[2], params).token_ids
    b = engine.generate(PROMPTS[2], params).token_ids
    c = engine.generate(PROMPTS[2], params.model_copy(update={"seed": 99})).token_ids
    assert a == b
    assert a != c


def test_batched_verification_equals_one_at_a_time(tiny_target):
    """Ragged caches and drafts in one padded pass give the same verdicts and caches as single steps."""
    params = SamplingParams(max_tokens=10)
    prompts = [tiny_target.tokenizer.encode(p) for p in PROMPTS[:4]]
    drafts = [[5, 6, 7], [], [9], [11, 12, 13, 14, 15]]
    single, batched = Verifier(tiny_target), Verifier(tiny_target)
    for i, ids in enumerate(prompts):
        single.add(f"s{i}", ids, params)
        batched.add(f"s{i}", ids, params)
    for _ in range(3):
        reqs = [StepRequest(f"s{i}", prompts[i][-1], drafts[i]) for i in range(4)]
        one = [single.verify([r])[0] for r in reqs]
        many = batched.verify(reqs)
        assert [a.verdict for a in one] == [b.verdict for b in many]
        for i in range(4):
            assert single.states[f"s{i}"].num_cached == batched.states[f"s{i}"].num_cached
            prompts[i] = prompts[i] + one[i].verdict.tokens  # the next step starts from the newest token
        drafts = [d[::-1] for d in drafts]


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_verifier_logits_equal_the_models_own_for_every_width(tiny_target, batch):
    """The LM head's rows are padded to a multiple of 4 on the CPU: the logits kept are the model's."""
    verifier = Verifier(tiny_target)
    ids = torch.arange(5, 5 + 9 * batch).view(batch, 9)
    with torch.inference_mode():
        full = tiny_target.model(input_ids=ids).logits  # [B, 9, vocab]
        for n in range(1, 10):
            out = verifier._model(n, input_ids=ids)
            assert out.logits.shape == (batch, n, full.shape[-1])
            torch.testing.assert_close(out.logits, full[:, -n:], rtol=1e-5, atol=1e-5)


def test_prefill_computes_one_row_of_logits(tiny_target):
    """A prefill's logits are never used: the pass asks the LM head for one row only."""
    verifier = Verifier(tiny_target)
    state_ids = tiny_target.tokenizer.encode(PROMPTS[0])
    verifier.add("s", state_ids, SamplingParams())
    state = verifier.states["s"]
    out = verifier._forward(state, [5, 6, 7], logits=False)
    assert out.logits.shape[1] == 1


def test_engine_times_its_passes_by_width_for_adaptive_k(tiny_target):
    """Every chain step of an adaptive request lands in the engine's table, shared by with_drafter."""
    engine = engine_for(tiny_target, "ngram", 4, adaptive=True)
    result = engine.generate(PROMPTS[0], SamplingParams(max_tokens=24))
    steps = result.stats.num_steps
    times = engine.pass_cost.times
    assert set(times) <= set(range(1, 6))  # widths 1 (plain) .. k + 1
    assert min(steps, 9) <= sum(len(t) for t in times.values()) <= steps  # the last 9 of each width are kept
    other = engine.with_drafter(DrafterConfig(kind="ngram", num_speculative_tokens=4))
    assert other.pass_cost is engine.pass_cost
    fixed = engine_for(tiny_target, "ngram", 4, adaptive=False)
    fixed.generate(PROMPTS[0], SamplingParams(max_tokens=8))
    assert fixed.pass_cost.times == {}  # a fixed k has nothing to price
    tree = engine.with_drafter(DrafterConfig(kind="ngram", num_speculative_tokens=4, tree=TreeConfig(max_nodes=8)))
    assert engine._priced_by_width() and not tree._priced_by_width()  # a tree's width is its node count


def test_prompt_longer_than_context_is_refused(tiny_target):
    engine = engine_for(tiny_target, "ngram", 4)
    with pytest.raises(SpecServeError) as e:
        engine.generate(list(range(5, 5 + tiny_target.max_context)), SamplingParams())
    assert e.value.param == "prompt" and "context" in str(e.value)


def test_empty_prompt_is_refused(tiny_target):
    with pytest.raises(SpecServeError) as e:
        engine_for(tiny_target, "none", 0).generate("   ", SamplingParams())
    assert e.value.param == "prompt"


@pytest.mark.parametrize("kind", ["none", "ngram", "draft_model", "draft_model_self"])
def test_sampling_preserves_the_target_distribution_for_every_drafter(tiny_target, drafter_paths, kind):
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    prompt_ids = tiny_target.tokenizer.encode(PROMPTS[2])
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    real_kind = "draft_model" if kind.startswith("draft_model") else kind
    engine = engine_for(tiny_target, real_kind, 3, path=drafter_paths.get(kind))
    n = 300
    counts, stats = sample_outcomes(engine, prompt_ids, params, n)
    if kind != "none":
        assert stats.num_draft_tokens > 0, "the drafter never proposed: the test would not exercise acceptance"
    assert chi_square_p_value(counts, expected, n) > 1e-3, counts
    # The same counts reject a 10% shift of mass between the two likeliest outcomes: the test has power.
    assert chi_square_p_value(counts, shifted(expected, 0.10), n) < 1e-3

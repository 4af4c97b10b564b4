"""Adaptive k: the cost model picks k from running acceptance, falls back to plain decoding and probes."""

import pytest

from specserve.config import DrafterConfig
from specserve.cost import PassCost, VerifyCost
from specserve.strategy import AdaptiveK, FixedK, make_strategy


def feed(strategy: AdaptiveK, num_draft: int, num_accepted: int, times: int) -> None:
    for _ in range(times):
        strategy.update(num_draft, num_accepted)


def test_full_acceptance_grows_k_to_its_maximum():
    s = AdaptiveK(k_max=8, cost_per_token=0.03)
    feed(s, 4, 4, 20)
    assert s.alpha > 0.95
    assert s.next_k() == 8


def test_rejection_at_the_first_token_switches_drafting_off_then_probes():
    s = AdaptiveK(k_max=8, cost_per_token=0.3, probe_every=4)
    feed(s, 4, 0, 20)
    assert s.best_k() == 0
    ks = [s.next_k() for _ in range(8)]
    assert ks == [0, 0, 0, 2, 0, 0, 0, 2]  # a small probe every probe_every plain steps


def test_probing_brings_drafting_back_when_text_turns_predictable():
    s = AdaptiveK(k_max=6, cost_per_token=0.1)
    feed(s, 4, 0, 20)
    assert s.best_k() == 0
    feed(s, 2, 2, 10)
    assert s.next_k() > 0


def test_costlier_drafting_chooses_shorter_blocks():
    cheap, costly = AdaptiveK(k_max=16, cost_per_token=0.02), AdaptiveK(k_max=16, cost_per_token=0.4)
    for s in (cheap, costly):
        feed(s, 4, 3, 10)
    assert 0 < costly.best_k() < cheap.best_k()


def test_plain_steps_do_not_move_the_estimate():
    s = AdaptiveK(k_max=4, cost_per_token=0.03)
    before = s.alpha
    s.update(0, 0)
    assert s.alpha == before


@pytest.mark.parametrize("cfg,expected", [
    (DrafterConfig(kind="none"), FixedK),
    (DrafterConfig(kind="ngram", num_speculative_tokens=0), FixedK),
    (DrafterConfig(kind="ngram", adaptive_k=False, num_speculative_tokens=5), FixedK),
    (DrafterConfig(kind="ngram"), AdaptiveK),
])
def test_make_strategy_follows_the_config(cfg, expected):
    s = make_strategy(cfg, 0.0)
    assert isinstance(s, expected)
    if cfg.kind == "none" or cfg.num_speculative_tokens == 0:
        assert s.next_k() == 0
    elif not cfg.adaptive_k:
        assert s.next_k() == cfg.num_speculative_tokens


def test_verify_cost_holds_the_prior_until_passes_of_several_sizes_were_seen():
    cost = VerifyCost(prior=0.03)
    assert cost.per_token(1) == pytest.approx(0.03)
    for _ in range(40):
        cost.observe(1, 0.020)  # one size only: the slope is not measurable
    assert cost.per_token(1) == pytest.approx(0.03)


def test_verify_cost_fits_measured_passes_and_grows_with_the_batch():
    cost = VerifyCost(prior=0.03)
    a, b = 0.020, 0.002  # seconds = a + b * tokens: one more token costs b / (a + b) = 9% at batch 1
    for tokens in [1, 5, 9, 17, 33, 65] * 10:
        cost.observe(tokens, a + b * tokens)
    assert cost.per_token(1) == pytest.approx(b / (a + b), rel=1e-3)
    assert cost.per_token(16) == pytest.approx(16 * b / (a + 16 * b), rel=1e-3)


def test_load_aware_k_shrinks_to_plain_decoding_as_the_batch_grows():
    cost = VerifyCost(prior=0.03)
    for tokens in [1, 5, 9, 17, 33, 65] * 10:
        cost.observe(tokens, 0.020 + 0.002 * tokens)
    batch = {"size": 1}
    s = make_strategy(DrafterConfig(kind="ngram", num_speculative_tokens=8), 0.0,
                      lambda: cost.per_token(batch["size"]))
    feed(s, 4, 2, 20)  # moderate acceptance
    k_alone = s.best_k()
    batch["size"] = 64
    assert 0 < k_alone and s.best_k() == 0


def test_a_request_can_turn_speculation_off():
    s = make_strategy(DrafterConfig(kind="ngram"), 0.0, speculative=False)
    assert isinstance(s, FixedK) and s.next_k() == 0


def test_pass_draft_length_keeps_drafts_that_all_sequences_share():
    from specserve.cost import pass_draft_length

    assert pass_draft_length([(6, 0.9)] * 8, ratio=0.03) == 6


def test_pass_draft_length_cuts_one_long_draft_that_would_widen_a_big_pass():
    """Inputs are padded to the longest: one sequence drafting 6 among 15 plain ones makes all 16 rows 7 wide."""
    from specserve.cost import pass_draft_length

    drafts = [(6, 0.6)] + [(0, None)] * 15
    assert pass_draft_length(drafts, ratio=0.05) == 0
    # Alone (or nearly so) the same draft pays: the pass's width costs little at batch 2.
    assert pass_draft_length([(6, 0.6), (0, None)], ratio=0.05) > 0


def test_pass_draft_length_never_cuts_below_an_uncuttable_draft():
    from specserve.cost import pass_draft_length

    drafts = [(6, 0.1), (3, None)] + [(0, None)] * 14
    assert pass_draft_length(drafts, ratio=0.05) == 3
    assert pass_draft_length([], ratio=0.05) == 0


def test_a_probe_is_marked_so_that_it_is_not_cut():
    strategy = AdaptiveK(6, 10.0, probe_every=2)  # drafting never pays at this cost: every other step probes
    ks = [(strategy.next_k(), strategy.probing) for _ in range(4)]
    assert ks == [(0, False), (2, True), (0, False), (2, True)]


def _table(times_ms: dict[int, float], repeats: int = 3) -> PassCost:
    cost = PassCost(0.03)
    for _ in range(repeats):
        for width, ms in times_ms.items():
            cost.observe(width, ms / 1000)
    return cost


def test_pass_cost_uses_the_prior_until_a_width_was_seen_enough_then_the_median():
    cost = PassCost(0.03, min_obs=3)
    assert cost.relative(4) == pytest.approx(1.12)
    for seconds in (0.050, 0.050, 0.050):
        cost.observe(1, seconds)
    for seconds in (0.075, 5.0):  # a kernel-building outlier among the first passes
        cost.observe(5, seconds)
    assert cost.relative(4) == pytest.approx(1.12)  # width 5 seen twice: still the prior
    cost.observe(5, 0.075)
    assert cost.relative(4) == pytest.approx(1.5)  # the median ignores the outlier
    assert cost.relative(0) == 1.0


def test_measured_costs_skip_widths_that_cost_more_than_wider_ones():
    """Where 2-3 inputs cost more than 5 (this project's AVX2 CPUs), adaptive k drafts 4, not 1-2."""
    cost = _table({1: 50, 2: 98, 3: 108, 4: 85, 5: 75, 6: 74, 7: 80})
    k = AdaptiveK(6, 0.03, pass_cost=cost)
    k.accepted, k.rejected = 7.0, 3.0  # alpha 0.7
    assert k.next_k() == 5  # width 6 is the cheapest wide pass (width 7 costs more)
    linear = AdaptiveK(6, 0.03)
    linear.accepted, linear.rejected = 7.0, 3.0
    assert linear.next_k() == 6


def test_measured_costs_turn_drafting_off_when_no_width_pays():
    """A first draft token that costs half a step never pays at 15% acceptance: plain decoding."""
    cost = _table({w: (50 if w == 1 else 75) for w in range(1, 8)})
    k = AdaptiveK(6, 0.03, pass_cost=cost)
    k.accepted, k.rejected = 0.15, 0.85
    assert k.best_k() == 0
    linear = AdaptiveK(6, 0.03)
    linear.accepted, linear.rejected = 0.15, 0.85
    assert linear.best_k() == 1  # the linear prior believes one draft token costs 3% of a step


def test_make_strategy_prices_steps_by_the_table_it_is_given():
    cost = _table({1: 50, 2: 100, 3: 100, 4: 100, 5: 100})
    cfg = DrafterConfig(kind="ngram", num_speculative_tokens=4)
    strategy = make_strategy(cfg, 0.0, pass_cost=cost)
    assert isinstance(strategy, AdaptiveK) and strategy.pass_cost is cost
    strategy.observe_pass(2, 0.1)
    assert len(cost.times[2]) == 4


def test_the_drafting_switch_learns_per_batch_size_whether_drafting_pays():
    from specserve.cost import DraftingSwitch

    switch = DraftingSwitch(explore_every=10, min_steps=4, run=2)
    assert all(switch.draft(3) for _ in range(50)), "below min_batch it always drafts"

    def steps(batch: int, n: int, drafting_rate: float, plain_rate: float) -> list[bool]:
        """``n`` steps at ``batch`` sequences whose committed tokens per second are the given rates."""
        plan = []
        for _ in range(n):
            drafted = switch.draft(batch)
            plan.append(drafted)
            switch.observe(batch, drafted, tokens=batch * 2, seconds=batch * 2 / (drafting_rate if drafted else plain_rate))
        return plan

    learning = steps(16, 8, drafting_rate=100.0, plain_rate=150.0)
    assert learning == [True, True, False, False] * 2  # both sides tried in runs until measured
    assert switch.rate(16, True) == pytest.approx(100.0) and switch.rate(16, False) == pytest.approx(150.0)
    later = steps(16, 40, drafting_rate=100.0, plain_rate=150.0)
    assert sum(later) == 4, later  # plain wins at 16: drafting only tried one step in ten
    # 32-63 sequences is another bucket: there drafting wins, so it drafts but for one step in ten.
    steps(40, 8, drafting_rate=200.0, plain_rate=150.0)
    assert sum(steps(40, 40, drafting_rate=200.0, plain_rate=150.0)) == 36
    # The traffic changes at 16: drafting pays now, and the fading means follow within a few explorations.
    flipped = steps(16, 400, drafting_rate=300.0, plain_rate=150.0)
    assert sum(flipped[-50:]) == 45, flipped[-50:]  # drafting, but for one plain step in ten

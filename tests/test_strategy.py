"""Adaptive k: the cost model picks k from running acceptance, falls back to plain decoding and probes."""

import pytest

from specserve.config import DrafterConfig
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

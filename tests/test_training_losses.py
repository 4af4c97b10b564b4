"""Block drafter losses on hand-built tensors with known values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from specserve.config import validated
from specserve.errors import SpecServeError
from specserve.training.config import LossConfig, TrainConfig
from specserve.training.losses import (
    block_losses,
    chain_value,
    expected_accepted_length,
    first_error_mask,
    positional_weights,
    token_ce,
)


def logits_with_probs(p_target: torch.Tensor, vocab: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, K, vocab] whose softmax gives the target token (id 0) probability ``p_target`` [N, K]."""
    rest = (1 - p_target) / (vocab - 1)
    probs = torch.cat([p_target[..., None], rest[..., None].expand(*p_target.shape, vocab - 1)], dim=-1)
    return probs.log(), torch.zeros(p_target.shape, dtype=torch.long)


def test_positional_weights_are_exp_minus_k_minus_one_over_gamma():
    w = positional_weights(5, gamma=10.0)
    assert torch.allclose(w, torch.tensor([math.exp(-(k - 1) / 10) for k in range(1, 6)]))
    assert w[0] == 1.0


def test_token_ce_is_minus_log_target_probability():
    p = torch.tensor([[0.5, 0.25, 0.9]])
    logits, targets = logits_with_probs(p)
    assert torch.allclose(token_ce(logits, targets), -p.log(), atol=1e-6)


def test_chain_loss_equals_expected_accepted_length_of_independent_positions():
    p = torch.tensor([[0.9, 0.5, 0.2]])
    # Enumerate accept/reject outcomes of independent positions: the accepted length is the correct prefix.
    expected = 0.0
    for outcome in itertools.product([True, False], repeat=3):
        prob = math.prod(pi if ok else 1 - pi for pi, ok in zip(p[0].tolist(), outcome, strict=True))
        expected += prob * next((i for i, ok in enumerate(outcome) if not ok), 3)
    assert expected_accepted_length(p).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.9 + 0.9 * 0.5 + 0.9 * 0.5 * 0.2)
    valid = torch.ones_like(p, dtype=torch.bool)
    assert chain_value(p, valid).item() == pytest.approx(expected / 3)


def test_chain_value_ignores_positions_past_the_sequence_end():
    p = torch.tensor([[0.5, 0.5, 0.9, 0.9]])
    valid = torch.tensor([[True, True, False, False]])
    assert chain_value(p, valid).item() == pytest.approx((0.5 + 0.25) / 2)


def test_first_error_is_the_first_wrong_argmax_per_block():
    targets = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0], [1, 2, 3, 0]])
    argmax = torch.tensor([[1, 0, 0, 1], [1, 2, 3, 0], [0, 2, 0, 0]])  # errors at 1; none; at 0
    logits = torch.nn.functional.one_hot(argmax, 4).float() * 5
    valid = torch.ones(3, 4, dtype=torch.bool)
    mask = first_error_mask(logits, targets, valid)
    assert mask.tolist() == [[False, True, False, False], [False] * 4, [True, False, False, False]]
    # A wrong token past the sequence end is not an error.
    valid[1, 3] = False
    argmax2 = argmax.clone()
    argmax2[1, 3] = 1
    mask2 = first_error_mask(torch.nn.functional.one_hot(argmax2, 4).float(), targets, valid)
    assert not mask2[1].any()


def test_block_losses_combine_terms_with_their_weights():
    p = torch.tensor([[0.8, 0.1, 0.6], [0.3, 0.7, 0.9]])
    logits, targets = logits_with_probs(p, vocab=4)  # target prob 0.1 / 0.3 < the others' share: wrong
    valid = torch.ones(2, 3, dtype=torch.bool)
    ce = -p.log()
    w = positional_weights(3, 10.0)
    weights = {"ce": 2.0, "positional_ce": 1.0, "first_error": 0.3, "chain": 40.0}
    total, terms = block_losses(logits, targets, valid, LossConfig(weights=weights))
    expect = {
        "ce": ce.mean().item(),
        "positional_ce": ((ce * w).sum() / (w.sum() * 2)).item(),
        # argmax is wrong where p < (1 - p) / 3, i.e. p < 0.25: block 0 at k=2, block 1 nowhere.
        "first_error": (ce[0, 1] / 2).item(),
        "chain": ((0.8 + 0.08 + 0.048) / 3 + (0.3 + 0.21 + 0.189) / 3) / 2,
    }
    for name, value in expect.items():
        assert terms[name] == pytest.approx(value, rel=1e-5), name
    want = 2 * expect["ce"] + expect["positional_ce"] + 0.3 * expect["first_error"] - 40 * expect["chain"]
    assert total.item() == pytest.approx(want, rel=1e-5)


def test_disabled_terms_do_not_enter_the_total():
    p = torch.tensor([[0.5, 0.5]])
    logits, targets = logits_with_probs(p)
    valid = torch.ones(1, 2, dtype=torch.bool)
    total, terms = block_losses(logits, targets, valid, LossConfig(weights={"ce": 1.0, "chain": 0.0}))
    assert total.item() == pytest.approx(terms["ce"])


@pytest.mark.parametrize("weights,needle", [
    ({"uniform_ce": 1.0}, "unknown loss 'uniform_ce'"),
    ({"ce": 0.0}, "positive weight"),
    ({"ce": 1.0, "chain": -1.0}, ">= 0"),
])
def test_bad_loss_config_is_a_clear_error(weights, needle):
    with pytest.raises(SpecServeError) as e:
        validated(TrainConfig, {"losses": {"weights": weights}})
    assert needle in str(e.value) and "losses.weights" in str(e.value)

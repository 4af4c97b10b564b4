"""The acceptance math: hand-written greedy cases, a slow reference, seeded determinism, and the
statistical check that speculative sampling reproduces the target distribution."""

from __future__ import annotations

import pytest
import torch
from distribution import onehot_logits

from specserve.config import SamplingParams
from specserve.sampling import logits_to_probs, make_generator, verify_block

GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0)


@pytest.mark.parametrize(
    "target,draft,tokens,accepted",
    [
        ([1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4], 3),  # all accepted + bonus
        ([1, 5, 3, 4], [1, 2, 3], [1, 5], 1),  # reject at position 1, recover the target's token
        ([7, 2, 3, 4], [1, 2, 3], [7], 0),  # reject at once
        ([6], [], [6], 0),  # k = 0: plain decoding
    ],
    ids=["all-accepted", "reject-middle", "reject-first", "no-draft"],
)
def test_greedy_verification_accepts_the_matching_prefix(target, draft, tokens, accepted):
    verdict = verify_block(onehot_logits(target), draft, None, GREEDY, None)
    assert verdict.tokens == tokens and verdict.num_accepted == accepted


def reference_verify(p: torch.Tensor, q: torch.Tensor, draft: list[int], u: list[float],
                     draws: list[torch.Tensor]) -> list[int]:
    """Slow textbook rejection sampling with given uniforms; ``draws`` picks the recovered/bonus token."""
    out = []
    for i, x in enumerate(draft):
        if u[i] < min(1.0, float(p[i, x] / q[i, x])):
            out.append(x)
            continue
        residual = torch.clamp(p[i] - q[i], min=0)
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=draws[0]))]
    return out + [int(torch.multinomial(p[len(draft)], 1, generator=draws[0]))]


def test_fast_verification_equals_slow_reference():
    torch.manual_seed(0)
    vocab, k = 12, 5
    for trial in range(200):
        target_logits = torch.randn(k + 1, vocab) * 2
        q = torch.softmax(torch.randn(k, vocab) * 2, -1)
        draft = [int(torch.multinomial(q[i], 1)) for i in range(k)]
        gen = make_generator(trial)
        got = verify_block(target_logits, draft, q, SAMPLE, gen)
        # Replay the same random stream: k float64 uniforms, then one categorical draw.
        replay = make_generator(trial)
        u = torch.rand(k, dtype=torch.float64, generator=replay).tolist()
        expected = reference_verify(torch.softmax(target_logits, -1), q, draft, u, [replay])
        assert got.tokens == expected


def test_seeded_verification_is_deterministic():
    logits = torch.randn(4, 16)
    q = torch.softmax(torch.randn(3, 16), -1)
    runs = [verify_block(logits, [1, 2, 3], q, SAMPLE, make_generator(7)).tokens for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def empirical_first_token(p_logits, q, n, seed, k=3, params=SAMPLE):
    """Distribution of the first committed token over n speculative steps with drafts sampled from q."""
    gen = make_generator(seed)
    vocab = p_logits.shape[-1]
    counts = torch.zeros(vocab)
    for _ in range(n):
        if q is None:  # deterministic (n-gram style) proposal: always the same block
            draft, probs = [0, 1, 2][:k], None
        else:
            draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
            probs = q
        tokens = verify_block(p_logits, draft, probs, params, gen).tokens
        counts[tokens[0]] += 1
    return counts / n


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


CASES = {
    "random-q": lambda p: torch.softmax(torch.randn(3, p.shape[-1]) * 3, -1),
    "q-equals-p": lambda p: torch.softmax(p[:3], -1),
    "q-zero-where-p-has-mass": lambda p: _zero_half(torch.softmax(torch.randn(3, p.shape[-1]), -1)),
    "deterministic-draft": lambda p: None,
}


def _zero_half(q: torch.Tensor) -> torch.Tensor:
    q[:, : q.shape[-1] // 2] = 0.0
    return q / q.sum(-1, keepdim=True)


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_converges_to_the_target_distribution(case):
    """The distance to the target shrinks as samples grow, and stays far below the distance
    to random reference distributions."""
    torch.manual_seed(1)
    vocab = 6
    p_logits = torch.randn(4, vocab) * 1.5
    target = torch.softmax(p_logits[0], -1)
    q = CASES[case](p_logits)
    small = empirical_first_token(p_logits, q, 200, seed=2)
    large = empirical_first_token(p_logits, q, 3000, seed=3)
    assert not torch.isnan(large).any()
    assert tv(large, target) < tv(small, target) + 0.01
    assert tv(large, target) < 0.04
    references = [torch.softmax(torch.randn(vocab) * 1.5, -1) for _ in range(20)]
    assert tv(large, target) < 0.3 * min(tv(large, r) for r in references)


def test_sampling_with_top_k_and_top_p_matches_the_processed_target():
    torch.manual_seed(4)
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.8)
    p_logits = torch.randn(4, 10) * 2
    target = logits_to_probs(p_logits[:1], params)[0]
    q = logits_to_probs(torch.randn(3, 10) * 2, params)
    got = empirical_first_token(p_logits, q, 3000, seed=5, params=params)
    assert tv(got, target) < 0.04
    assert float(got[target == 0].sum()) == 0.0  # filtered tokens never appear


def test_logits_to_probs_filters_as_specified():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top_k = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (top_k[0, 2:] == 0).all() and abs(float(top_k.sum()) - 1) < 1e-6
    full = torch.softmax(logits, -1)[0]
    top_p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-4))
    assert (top_p[0, 2:] == 0).all() and float(top_p[0, 1]) > 0  # smallest prefix reaching top_p
    cold = logits_to_probs(logits, SamplingParams(temperature=0.01))
    assert float(cold[0, 0]) > 0.999

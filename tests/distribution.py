"""Helpers of the distribution tests: exact target probabilities of short continuations, chi-square."""

from __future__ import annotations

import torch

from specserve.config import SamplingParams
from specserve.sampling import logits_to_probs
from specserve.stats import SpecStats


def onehot_logits(ids: list[int], vocab: int = 8) -> torch.Tensor:
    """Logits under which the target's argmax at row i is ``ids[i]``, by a wide margin."""
    logits = torch.full((len(ids), vocab), -10.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 10.0
    return logits  # [len(ids), vocab]


def two_token_distribution(target, prompt_ids: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """Exact P(t1, t2) of every 2-token continuation under the target with ``params`` applied."""
    with torch.inference_mode():
        p1 = logits_to_probs(target.model(torch.tensor([prompt_ids])).logits[0, -1:], params)[0]  # [vocab]
        out = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = logits_to_probs(target.model(torch.tensor([prompt_ids + [t1]])).logits[0, -1:], params)[0]
            for t2 in torch.nonzero(p2).flatten().tolist():
                out[(t1, t2)] = float(p1[t1] * p2[t2])
    return out


def chi_square_p_value(counts: dict, expected: dict[tuple, float], n: int) -> float:
    """Pearson's test of observed counts against probabilities; cells expecting < 5 draws are pooled.

    Fails outright if an outcome the target cannot produce occurred.
    """
    impossible = set(counts) - set(expected)
    assert not impossible, f"outcomes with zero target probability occurred: {sorted(impossible)[:5]}"
    cells = [(counts.get(o, 0), n * p) for o, p in expected.items() if n * p >= 5]
    small = [(counts.get(o, 0), n * p) for o, p in expected.items() if n * p < 5]
    if small:
        cells.append((sum(c for c, _ in small), sum(e for _, e in small)))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def shifted(expected: dict[tuple, float], mass: float) -> dict[tuple, float]:
    """``expected`` with ``mass`` moved from the likeliest outcome to the second: a bias the test must see."""
    top, second = sorted(expected, key=expected.get, reverse=True)[:2]
    out = dict(expected)
    out[top] -= mass
    out[second] += mass
    return out


def sample_outcomes(engine, prompt_ids: list[int], params: SamplingParams,
                    n: int) -> tuple[dict[tuple, int], SpecStats]:
    """Generate ``n`` seeded continuations with ``engine``: counts per outcome and the summed statistics.

    A distribution test means something only if the drafter proposed and verification accepted some of
    it (``stats.num_draft_tokens``, ``stats.num_accepted_tokens``): otherwise only plain sampling ran.
    """
    counts: dict[tuple, int] = {}
    stats = SpecStats()
    for seed in range(n):
        result = engine.generate(prompt_ids, params.model_copy(update={"seed": seed}))
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        stats.merge(result.stats)
    return counts, stats


def assert_drafts_accepted_and_rejected(stats: SpecStats) -> None:
    """Fail unless the drafter proposed and verification accepted some draft tokens and rejected others.

    A drafter that proposes nothing, or only tokens the target never samples, passes a distribution test
    without exercising the acceptance test at all.
    """
    assert stats.num_draft_tokens > 0, "the drafter never proposed: only plain sampling ran"
    assert stats.num_accepted_tokens > 0, f"none of {stats.num_draft_tokens} draft tokens was accepted"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "every draft token was accepted: no rejection ran"


#: The cell that pools every outcome outside the few likeliest ones (:func:`top_two_token_distribution`).
OTHER = ("other",)


def top_two_token_distribution(target, prompt_ids: list[int], params: SamplingParams,
                               top: int = 6) -> dict[tuple, float]:
    """Exact P(t1, t2) of the likeliest ``top`` x ``top`` 2-token continuations, the rest pooled in ``OTHER``.

    For sampling without top-k / top-p, where every pair of the vocabulary is possible.
    """
    with torch.inference_mode():
        p1 = logits_to_probs(target.model(torch.tensor([prompt_ids])).logits[0, -1:], params)[0]  # [vocab]
        out = {}
        for t1 in torch.topk(p1, top).indices.tolist():
            p2 = logits_to_probs(target.model(torch.tensor([prompt_ids + [t1]])).logits[0, -1:], params)[0]
            for t2 in torch.topk(p2, top).indices.tolist():
                out[(t1, t2)] = float(p1[t1] * p2[t2])
    out[OTHER] = max(0.0, 1.0 - sum(out.values()))
    return out


def pooled(counts: dict[tuple, int], expected: dict[tuple, float]) -> dict[tuple, int]:
    """``counts`` with every outcome that ``expected`` does not list counted in ``OTHER``."""
    out: dict[tuple, int] = {}
    for outcome, c in counts.items():
        key = outcome if outcome in expected else OTHER
        out[key] = out.get(key, 0) + c
    return out

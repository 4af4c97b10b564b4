"""Turning logits into distributions, and verifying a draft block against the target.

Vocabulary (as in the speculative decoding literature and vLLM):

* **draft tokens**: the k tokens a drafter proposes, ``d_1..d_k``.
* **accepted tokens**: the longest prefix of the draft that verification keeps.
* **recovered token**: at the first rejected position, a token resampled from the residual
  distribution ``norm(max(0, p - q))``; with greedy decoding, the target's argmax.
* **bonus token**: when all k draft tokens are accepted, one more token sampled from the
  target's distribution after ``d_k`` (free: the verification pass computed it).

Every verification step therefore commits ``num_accepted + 1`` tokens. With ``q`` the
draft's distribution and ``p`` the target's, accepting ``d_i`` with probability
``min(1, p(d_i) / q(d_i))`` and resampling from the residual on rejection yields tokens
distributed exactly as ``p`` (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318). Temperature, top-k and top-p are applied identically to both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.config import SamplingParams


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` [n, vocab] and return probabilities [n, vocab] (fp32).

    Must not be called with temperature 0 (greedy uses the argmax of the raw logits).
    """
    logits = logits.float() / params.temperature  # [n, vocab]
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [n, vocab]
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when the request has a seed, else from entropy."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from ``probs`` [vocab]."""
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator).item())


@dataclass
class Verdict:
    """What verification of one block decided."""

    tokens: list[int]  # accepted draft tokens, then the recovered or bonus token
    num_accepted: int  # how many draft tokens were accepted (0..k)


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Verdict:
    """Accept a prefix of ``draft_tokens`` and add one target token.

    target_logits: [k + 1, vocab]: row i is the target's next-token logits after draft token i
        (row 0 after the last committed token).
    draft_tokens: the k draft tokens.
    draft_probs: [k, vocab] the drafter's distribution q for each draft token, or None when the
        drafter proposes deterministically (n-gram lookup, greedy drafts): q is then one-hot.
    """
    k = len(draft_tokens)
    assert target_logits.shape[0] == k + 1, (target_logits.shape, k)
    if params.greedy:
        target_argmax = target_logits.argmax(dim=-1).tolist()  # [k + 1]
        n = 0
        while n < k and draft_tokens[n] == target_argmax[n]:
            n += 1
        return Verdict(draft_tokens[:n] + [target_argmax[n]], n)

    assert generator is not None, "sampling needs a generator"
    p = logits_to_probs(target_logits, params).cpu()  # [k + 1, vocab]
    if k == 0:
        return Verdict([sample(p[0], generator)], 0)
    idx = torch.tensor(draft_tokens, dtype=torch.long)  # [k]
    p_draft = p[:-1].gather(1, idx[:, None]).squeeze(1).double()  # [k]: p(d_i)
    if draft_probs is None:
        q_draft = torch.ones(k, dtype=torch.float64)  # one-hot q: q(d_i) = 1
    else:
        draft_probs = draft_probs.float().cpu()
        q_draft = draft_probs.gather(1, idx[:, None]).squeeze(1).double()  # [k]: q(d_i)
    # float64 uniforms: with fp32, u can round to exactly 1.0 and tiny acceptance ratios lose precision.
    u = torch.rand(k, dtype=torch.float64, generator=generator)  # [k]
    # A drafter cannot have sampled a token it gave zero probability; guard the division anyway.
    ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp_min(1e-300), (p_draft > 0).double())
    accepted = u < ratio.clamp(max=1.0)  # [k]
    n = int(accepted.long().cumprod(0).sum().item())
    if n == k:
        return Verdict(list(draft_tokens) + [sample(p[k], generator)], k)
    if draft_probs is None:
        q_row = torch.zeros_like(p[n])
        q_row[draft_tokens[n]] = 1.0
    else:
        q_row = draft_probs[n]
    residual = (p[n] - q_row).clamp_min(0.0)  # [vocab]: norm(max(0, p - q))
    if residual.sum() <= 0:
        # p == q up to rounding: rejection had probability ~0; p itself is the right distribution.
        residual = p[n]
    return Verdict(list(draft_tokens[:n]) + [sample(residual, generator)], n)

"""Block drafter losses, after "Teaching Diffusion to Speculate Left-to-Right" (arXiv 2606.11552).

Notation: a block has K positions k = 1..K; ``p_k`` is the drafter's probability of the target
token at position k. Verification accepts the longest correct prefix, so position k only
counts if positions 1..k-1 were right. The terms:

* ``ce``: cross-entropy averaged uniformly over valid block positions;
* ``positional_ce``: the same with weights ``w_k = exp(-(k-1)/gamma)``: early positions, which
  every accepted prefix passes through, weigh more;
* ``first_error``: an extra cross-entropy term at the first position whose argmax is wrong
  (where the accepted prefix ends), averaged over blocks (a block without an error adds 0);
* ``chain``: ``mean_k prod_{j<=k} p_j``, the expected accepted length of the block divided by K
  when positions are independent; it is maximised, i.e. subtracted from the total.

Blocks cut short by the end of a sequence carry ``valid = False`` on their trailing positions.

**Soft labels** (online distillation): given the target's distribution at each position, ``ce``
and ``positional_ce`` use the cross-entropy against it, ``-sum_v p_target(v) log q(v)`` (the KL
to the target up to the target's entropy), and ``targets`` is the target's argmax, which is what
greedy verification accepts; ``first_error`` and ``chain`` are defined on it as above. A target
index of -1 (the target's choice lies outside a trimmed draft vocabulary) can never be matched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.training.config import LossConfig


def positional_weights(k: int, gamma: float) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 1..K, as [K]."""
    return torch.exp(-torch.arange(k, dtype=torch.float32) / gamma)


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N, K] of ``logits`` [N, K, vocab] against ``targets`` [N, K] (-1: no target, 0 loss)."""
    n, k, v = logits.shape
    return F.cross_entropy(logits.reshape(n * k, v).float(), targets.reshape(n * k), reduction="none",
                           ignore_index=-1).view(n, k)


def soft_ce(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N, K] of ``logits`` [N, K, vocab] against distributions ``soft`` [N, K, vocab]."""
    return -(soft * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def target_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The drafter's probability [N, K] of ``targets`` [N, K] (0 where the target is -1)."""
    p = F.softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return torch.where(targets >= 0, p, torch.zeros_like(p))


def first_error_mask(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, K] bool: True at the first valid position whose argmax differs from the target, per block."""
    wrong = (logits.argmax(-1) != targets) & valid  # [N, K]
    before = torch.cumsum(wrong.long(), dim=1) - wrong.long()  # errors strictly before k
    return wrong & (before == 0)


def expected_accepted_length(p: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k prod_{j<=k} p_j per block [N], from target-token probabilities ``p`` [N, K].

    With independent positions accepted with probability p_j this is the expected number of
    accepted draft tokens (the bonus token not counted).
    """
    if valid is not None:
        p = torch.where(valid, p, torch.zeros_like(p))  # an invalid (suffix) position ends the chain
    return torch.cumprod(p, dim=1).sum(dim=1)


def chain_value(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over valid k of prod_{j<=k} p_j, per block [N] (0 for a block with no valid position)."""
    n_valid = valid.sum(dim=1).clamp_min(1)
    return expected_accepted_length(p, valid) / n_valid


def block_losses(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                 cfg: LossConfig, soft: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total loss and every term's value (all terms are logged, enabled or not).

    logits: [N, K, vocab]; targets: [N, K] (-1: unreachable); valid: [N, K] bool;
    soft: [N, K, vocab] target distributions (soft labels) or None (hard labels = ``targets``).
    """
    if soft is None:
        ce = token_ce(logits, targets)  # [N, K]
        p = torch.exp(-ce)  # [N, K] drafter probability of the target token
    else:
        ce = soft_ce(logits, soft)  # [N, K]
        p = target_prob(logits, targets)  # [N, K]
    validf = valid.float()
    w = positional_weights(ce.shape[1], cfg.gamma).to(ce.device)[None] * validf  # [N, K]
    fe = first_error_mask(logits.detach(), targets, valid).float()
    terms = {
        "ce": (ce * validf).sum() / validf.sum().clamp_min(1),
        "positional_ce": (ce * w).sum() / w.sum().clamp_min(1e-9),
        "first_error": (ce * fe).sum() / ce.shape[0],
        "chain": chain_value(p, valid).mean(),
    }
    total = ce.new_zeros(())
    for name, weight in cfg.weights.items():
        if weight:
            total = total - weight * terms[name] if name == "chain" else total + weight * terms[name]
    log = {name: float(value.detach()) for name, value in terms.items()}
    log["accepted_length"] = float(expected_accepted_length(p.detach(), valid).mean())
    # Greedy: leading positions whose argmax is the target's choice (what greedy verification accepts).
    hits = (logits.detach().argmax(-1) == targets) & valid  # [N, K]
    log["greedy_accepted"] = float(torch.cumprod(hits.float(), dim=1).sum(dim=1).mean())
    return total, log

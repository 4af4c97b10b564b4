"""How many tokens to draft next: a fixed k, or an adaptive k driven by running acceptance.

The adaptive strategy models acceptance as independent per position with rate ``alpha``:
a block of k yields ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average and costs
``1 + (c_verify + c_draft) * k`` target-step equivalents. It picks the k with the most
tokens per cost; when that is k = 0 (drafting does not pay) it decodes plainly and
probes with a small block every ``probe_every`` steps so that a request whose text turns
predictable (code being rewritten, a list being repeated) gets drafting back.

What a draft token costs, and what a block yields, is :mod:`specserve.cost`: the one cost model
every host feeds with what it measures (verification passes) and every policy asks (this
strategy, the batcher's pass width, the hybrid drafter's choice of source).
"""

from __future__ import annotations

from collections.abc import Callable

from specserve.config import DrafterConfig
from specserve.cost import PassCost, best_k


class KStrategy:
    """Interface: ``next_k()`` before a step, ``update()`` after verification."""

    def next_k(self) -> int:
        """Draft length for the next step (0 = plain decoding)."""
        raise NotImplementedError

    def update(self, num_draft: int, num_accepted: int) -> None:
        """Learn from one verified block."""

    def observe_pass(self, width: int, seconds: float) -> None:
        """One single-sequence verification pass over ``width`` inputs (newest token + draft) took ``seconds``."""


class FixedK(KStrategy):
    """Always draft ``k`` tokens."""

    def __init__(self, k: int):
        self.k = k

    def next_k(self) -> int:
        return self.k


class AdaptiveK(KStrategy):
    """Pick k from an exponentially weighted acceptance estimate and a cost model.

    ``cost_per_token`` is a number, or a function read before every step (the load-aware cost).
    """

    def __init__(self, k_max: int, cost_per_token: float | Callable[[], float], *, decay: float = 0.9,
                 probe_every: int = 8, prior_alpha: float = 0.6, pass_cost: PassCost | None = None,
                 draft_cost_per_token: float = 0.0):
        self.k_max = k_max
        self.cost = cost_per_token if callable(cost_per_token) else (lambda: cost_per_token)
        # With a measured table, a k-token step costs pass_cost.relative(k) + drafting (the table
        # replaces the linear verification term of ``cost_per_token``).
        self.pass_cost = pass_cost
        self.draft_cost = draft_cost_per_token
        self.decay = decay
        self.probe_every = probe_every
        # Pseudo-counts: the prior behaves like a few observed tokens, so one bad block does not
        # switch drafting off and one lucky block does not jump to k_max.
        self.accepted = 2.0 * prior_alpha
        self.rejected = 2.0 * (1.0 - prior_alpha)
        self.plain_steps = 0
        self.probing = False  # the last next_k() was a probe (drafting would not pay by the estimate)

    @property
    def alpha(self) -> float:
        """Estimated probability that the next draft token is accepted."""
        return self.accepted / (self.accepted + self.rejected)

    def best_k(self) -> int:
        """The k in [0, k_max] with the most expected tokens per unit of cost (:func:`specserve.cost.best_k`)."""
        if self.pass_cost is not None:
            return best_k(self.alpha, self.k_max, lambda k: self.pass_cost.relative(k) + self.draft_cost * k)
        cost = self.cost()
        return best_k(self.alpha, self.k_max, lambda k: 1 + cost * k)

    def next_k(self) -> int:
        k = self.best_k()
        self.probing = False
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps % self.probe_every == 0:
                self.probing = True
                return min(2, self.k_max)
        return k

    def observe_pass(self, width: int, seconds: float) -> None:
        if self.pass_cost is not None:
            self.pass_cost.observe(width, seconds)

    def update(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        rejected = 1 if num_accepted < num_draft else 0
        self.accepted = self.decay * self.accepted + num_accepted
        self.rejected = self.decay * self.rejected + rejected


def make_strategy(cfg: DrafterConfig, draft_cost_per_token: float,
                  verify_cost: Callable[[], float] | None = None, *, speculative: bool = True,
                  pass_cost: PassCost | None = None) -> KStrategy:
    """The strategy a request uses, from the drafter config and the drafter's own cost estimate.

    ``verify_cost``: the load-aware verification cost per draft token (default: the config's
    batch-1 figure). ``pass_cost``: a measured table of single-sequence pass times by width (an
    in-process engine's), used instead when given. ``speculative=False`` (a request that turned
    speculation off) decodes plainly.
    """
    if not speculative or not cfg.drafts:
        return FixedK(0)
    if not cfg.adaptive_k:
        return FixedK(cfg.num_speculative_tokens)
    c_draft = cfg.draft_cost_per_token if cfg.draft_cost_per_token is not None else draft_cost_per_token
    if pass_cost is not None:
        return AdaptiveK(cfg.num_speculative_tokens, cfg.verify_cost_per_token + c_draft, pass_cost=pass_cost,
                         draft_cost_per_token=c_draft)
    if verify_cost is None:
        return AdaptiveK(cfg.num_speculative_tokens, cfg.verify_cost_per_token + c_draft)
    return AdaptiveK(cfg.num_speculative_tokens, lambda: verify_cost() + c_draft)

"""How many tokens to draft next: a fixed k, or an adaptive k driven by running acceptance.

The adaptive strategy models acceptance as independent per position with rate ``alpha``:
a block of k yields ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average and costs
``1 + (c_verify + c_draft) * k`` target-step equivalents. It picks the k with the most
tokens per cost; when that is k = 0 (drafting does not pay) it decodes plainly and
probes with a small block every ``probe_every`` steps so that a request whose text turns
predictable (code being rewritten, a list being repeated) gets drafting back.
"""

from __future__ import annotations

from specserve.config import DrafterConfig


class KStrategy:
    """Interface: ``next_k()`` before a step, ``update()`` after verification."""

    def next_k(self) -> int:
        """Draft length for the next step (0 = plain decoding)."""
        raise NotImplementedError

    def update(self, num_draft: int, num_accepted: int) -> None:
        """Learn from one verified block."""


class FixedK(KStrategy):
    """Always draft ``k`` tokens."""

    def __init__(self, k: int):
        self.k = k

    def next_k(self) -> int:
        return self.k


class AdaptiveK(KStrategy):
    """Pick k from an exponentially weighted acceptance estimate and a cost model."""

    def __init__(self, k_max: int, cost_per_token: float, *, decay: float = 0.9, probe_every: int = 8,
                 prior_alpha: float = 0.6):
        self.k_max = k_max
        self.cost_per_token = cost_per_token
        self.decay = decay
        self.probe_every = probe_every
        # Pseudo-counts: the prior behaves like a few observed tokens, so one bad block does not
        # switch drafting off and one lucky block does not jump to k_max.
        self.accepted = 2.0 * prior_alpha
        self.rejected = 2.0 * (1.0 - prior_alpha)
        self.plain_steps = 0

    @property
    def alpha(self) -> float:
        """Estimated probability that the next draft token is accepted."""
        return self.accepted / (self.accepted + self.rejected)

    def best_k(self) -> int:
        """The k in [0, k_max] with the most expected tokens per unit of cost."""
        a = min(self.alpha, 0.999)
        best, best_rate = 0, 1.0
        for k in range(1, self.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (1 + self.cost_per_token * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def next_k(self) -> int:
        k = self.best_k()
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps % self.probe_every == 0:
                return min(2, self.k_max)
        return k

    def update(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        rejected = 1 if num_accepted < num_draft else 0
        self.accepted = self.decay * self.accepted + num_accepted
        self.rejected = self.decay * self.rejected + rejected


def make_strategy(cfg: DrafterConfig, draft_cost_per_token: float) -> KStrategy:
    """The strategy a request uses, from the drafter config and the drafter's own cost estimate."""
    if cfg.num_speculative_tokens == 0 or cfg.kind == "none":
        return FixedK(0)
    if not cfg.adaptive_k:
        return FixedK(cfg.num_speculative_tokens)
    c_draft = cfg.draft_cost_per_token if cfg.draft_cost_per_token is not None else draft_cost_per_token
    return AdaptiveK(cfg.num_speculative_tokens, cfg.verify_cost_per_token + c_draft)

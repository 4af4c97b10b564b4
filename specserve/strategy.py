"""How many tokens to draft next: a fixed k, or an adaptive k driven by running acceptance.

The adaptive strategy models acceptance as independent per position with rate ``alpha``:
a block of k yields ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average and costs
``1 + (c_verify + c_draft) * k`` target-step equivalents. It picks the k with the most
tokens per cost; when that is k = 0 (drafting does not pay) it decodes plainly and
probes with a small block every ``probe_every`` steps so that a request whose text turns
predictable (code being rewritten, a list being repeated) gets drafting back.

Under load the verification cost of a draft token grows: a pass over B sequences costs
``a + b * tokens``, so one more draft token per sequence costs ``b * B / (a + b * B)`` of a
plain batched step, not ``b / (a + b)``. :class:`VerifyCost` fits ``a`` and ``b`` from the
passes a target group actually runs and gives that cost for the running batch size, so k
shrinks (to 0 when drafting does not pay) as the batch grows.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

from specserve.config import DrafterConfig


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


class VerifyCost:
    """Measured cost of verification passes, ``seconds = a + b * tokens``, fitted online.

    ``prior`` is the extra cost of one draft token at batch 1 as a fraction of a step (the
    config's ``verify_cost_per_token``); it holds until passes of enough different sizes
    were seen. Old passes fade with ``decay`` so the fit follows a changing machine.
    """

    def __init__(self, prior: float, *, decay: float = 0.99, min_passes: int = 16):
        self.prior_ratio = prior / max(1e-6, 1.0 - prior)  # b / a implied by the prior
        self.decay = decay
        self.min_passes = min_passes
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.passes = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """One verification pass over ``tokens`` input tokens (all sequences of the batch) took ``seconds``."""
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + tokens, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + tokens * tokens, d * self.sxy + tokens * seconds
        self.passes += 1

    def ratio(self) -> float:
        """b / a: what one more token costs relative to a pass's fixed part."""
        if self.passes >= self.min_passes:
            var = self.sxx / self.n - (self.sx / self.n) ** 2
            if var > 1.0:  # passes of different sizes were seen: the slope is measurable
                b = (self.sxy / self.n - self.sx / self.n * self.sy / self.n) / var
                a = self.sy / self.n - b * self.sx / self.n
                if b > 0 and a > 0:
                    return b / a
        return self.prior_ratio

    def per_token(self, batch_size: int) -> float:
        """Cost of one more draft token per sequence, as a fraction of a plain step at this batch size."""
        r = self.ratio() * max(1, batch_size)
        return r / (1.0 + r)


class PassCost:
    """Measured time of single-sequence verification passes by width, relative to a plain step.

    A linear model (``1 + c * k``) does not describe every machine: on this project's AVX2 CPUs
    (MKL, fp32) a pass over 2-3 inputs costs more than one over 5-8, because the matrix products
    of 2-3 rows are slow (docs/benchmarks.md, "pass time by width"). The table keeps the last
    ``window`` pass times of every width and answers the cost of a k-token block as the ratio of
    the medians ``t(k + 1) / t(1)`` (a median shrugs off a pass that built kernels or met a busy
    machine) once both widths were seen ``min_obs`` times. Unseen widths use the linear prior,
    which is optimistic, so adaptive k tries them and the table fills where it matters. One table
    serves every request of an engine: the cost is the machine's, not the request's.
    """

    def __init__(self, prior_per_token: float, *, window: int = 9, min_obs: int = 3):
        self.prior = prior_per_token
        self.window = window
        self.min_obs = min_obs
        self.times: dict[int, deque[float]] = {}  # width -> the last pass times in seconds

    def observe(self, width: int, seconds: float) -> None:
        """One pass over ``width`` inputs of one sequence took ``seconds``."""
        if width >= 1 and seconds > 0:
            self.times.setdefault(width, deque(maxlen=self.window)).append(seconds)

    def seconds(self, width: int) -> float | None:
        """Median time of a pass this wide, or None before ``min_obs`` passes."""
        times = self.times.get(width)
        return statistics.median(times) if times and len(times) >= self.min_obs else None

    def relative(self, k: int) -> float:
        """Cost of verifying a k-token block, in plain steps (1.0 for k = 0)."""
        plain, wide = self.seconds(1), self.seconds(k + 1)
        if k > 0 and plain and wide:
            return wide / plain
        return 1.0 + self.prior * k


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
        """The k in [0, k_max] with the most expected tokens per unit of cost."""
        a = min(self.alpha, 0.999)
        cost = self.cost()
        best, best_rate = 0, 1.0
        for k in range(1, self.k_max + 1):
            if self.pass_cost is not None:
                step_cost = self.pass_cost.relative(k) + self.draft_cost * k
            else:
                step_cost = 1 + cost * k
            rate = (1 - a ** (k + 1)) / (1 - a) / step_cost
            if rate > best_rate:
                best, best_rate = k, rate
        return best

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


def expected_tokens(k: int, alpha: float) -> float:
    """Tokens one verified block of ``k`` draft tokens yields on average (accepted + the target's own)."""
    a = min(max(alpha, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def pass_draft_length(drafts: list[tuple[int, float | None]], ratio: float) -> int:
    """How many draft tokens per sequence one batched verification pass should check.

    A pass over B sequences whose inputs are right-padded to the longest costs ``a + b * B * (1 + L)``
    for a longest draft of L: one sequence drafting 6 tokens among 15 drafting none makes the whole
    pass 7 tokens wide. ``drafts`` holds each sequence's draft length and acceptance estimate (None:
    not to be cut: a fixed k, a probe, a tree); ``ratio`` is b / a (:meth:`VerifyCost.ratio`). Returns
    the L (at least every uncuttable draft's length) with the most expected tokens per unit of cost;
    drafts longer than L are verified only up to L, which is lossless: a prefix of a draft is a draft.
    """
    if not drafts:
        return 0
    floor = max((k for k, a in drafts if a is None), default=0)
    top = max(k for k, _ in drafts)
    batch = len(drafts)
    best, best_rate = top, -1.0
    for length in range(floor, top + 1):
        tokens = sum(expected_tokens(min(k, length), 0.5 if a is None else a) for k, a in drafts)
        rate = tokens / (1.0 + ratio * batch * (1 + length))
        if rate > best_rate + 1e-12:
            best, best_rate = length, rate
    return best


def make_strategy(cfg: DrafterConfig, draft_cost_per_token: float,
                  verify_cost: Callable[[], float] | None = None, *, speculative: bool = True,
                  pass_cost: PassCost | None = None) -> KStrategy:
    """The strategy a request uses, from the drafter config and the drafter's own cost estimate.

    ``verify_cost``: the load-aware verification cost per draft token (default: the config's
    batch-1 figure). ``pass_cost``: a measured table of single-sequence pass times by width (an
    in-process engine's), used instead when given. ``speculative=False`` (a request that turned
    speculation off) decodes plainly.
    """
    if not speculative or cfg.num_speculative_tokens == 0 or cfg.kind == "none":
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

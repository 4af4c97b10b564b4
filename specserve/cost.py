"""The cost model of speculation: what a block yields, what it costs, and the k that pays best.

Every policy asks here and every host feeds it what it measures:
- **Yield.** Acceptance is modelled as independent per position with rate ``alpha``: a block of k
  draft tokens yields ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average (:func:`expected_tokens`).
- **Cost**, in plain decoding steps. A k-token block costs ``1 + c * k`` with ``c`` the cost of one
  draft token (verification + drafting), or, where passes of every width were timed on this machine,
  ``t(k + 1) / t(1)`` (:class:`PassCost`: the in-process engine feeds it). Under load a pass over B
  sequences costs ``a + b * tokens``, so one more draft token per sequence costs ``b * B / (a + b * B)``
  of a plain batched step, not ``b / (a + b)``; :class:`VerifyCost` fits ``a`` and ``b`` from the passes
  a target group or vLLM actually runs (the hf batcher and the vLLM proposer feed it).
- **Choice.** :func:`best_k` (per request: adaptive k), :func:`pass_draft_length` (per batched pass:
  how far to verify right-padded drafts), :func:`rate` (any two options: the hybrid drafter's sources).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable


def expected_tokens(k: int, alpha: float) -> float:
    """Tokens one verified block of ``k`` draft tokens yields on average (accepted + the target's own)."""
    a = min(max(alpha, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def rate(tokens: float, cost: float) -> float:
    """Tokens per plain-step equivalent: what every choice between drafting options maximises."""
    return tokens / cost


def best_k(alpha: float, k_max: int, step_cost: Callable[[int], float]) -> int:
    """The k in [0, k_max] with the most expected tokens per unit of cost (0: plain decoding pays best).

    ``step_cost(k)``: a k-token block's cost in plain steps (a plain step costs 1 and yields 1 token).
    """
    best, best_rate = 0, 1.0
    for k in range(1, k_max + 1):
        r = rate(expected_tokens(k, alpha), step_cost(k))
        if r > best_rate:
            best, best_rate = k, r
    return best


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
        r = rate(tokens, 1.0 + ratio * batch * (1 + length))
        if r > best_rate + 1e-12:
            best, best_rate = length, r
    return best


class DraftingSwitch:
    """Whether drafting pays at a batch size, from the committed tokens per second this machine measures.

    Per-token prices (:class:`VerifyCost`) miss what speculation costs beside the verified tokens: the
    engine's bookkeeping of drafts, a rejection sampler, scheduling it cannot overlap. So the host also
    times whole steps: per batch-size bucket (1, 2-3, 4-7, 8-15, ...) it keeps a fading mean of committed
    tokens per second over steps that verified drafts and over steps that drafted nothing, and drafts in a
    bucket only while the first is ahead. The losing side is still tried one step in ``explore_every``
    (so a bucket whose answer changes with the traffic is noticed); until both sides have ``min_steps``
    steps in a bucket, they alternate in runs of ``run`` steps. Below ``min_batch`` sequences it always
    drafts: there a step's cost is nearly all fixed, and the per-token price is what decides.
    """

    def __init__(self, *, min_batch: int = 4, explore_every: int = 64, min_steps: int = 8, run: int = 4,
                 decay: float = 0.95):
        self.min_batch = min_batch
        self.explore_every = explore_every
        self.min_steps = min_steps
        self.run = run
        self.decay = decay
        # bucket -> [tokens, seconds, steps] (faded sums) for drafting (index 1) and plain (index 0) steps
        self.sums: dict[int, list[list[float]]] = {}
        self.steps: dict[int, int] = {}  # bucket -> steps planned there

    @staticmethod
    def bucket(batch_size: int) -> int:
        """0 for one sequence, 1 for 2-3, 2 for 4-7, ...: powers of two."""
        return max(1, batch_size).bit_length() - 1

    def observe(self, batch_size: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One step over ``batch_size`` sequences committed ``tokens`` tokens in ``seconds`` (wall time from
        the previous step's start), having verified drafts (``drafted``) or none."""
        if seconds <= 0:
            return
        side = self.sums.setdefault(self.bucket(batch_size), [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])[int(drafted)]
        d = self.decay
        side[0], side[1], side[2] = d * side[0] + tokens, d * side[1] + seconds, side[2] + 1

    def rate(self, batch_size: int, drafted: bool) -> float | None:
        """Measured committed tokens per second at this batch size, drafting or plain (None: too few steps)."""
        sides = self.sums.get(self.bucket(batch_size))
        if sides is None or sides[int(drafted)][2] < self.min_steps:
            return None
        tokens, seconds, _ = sides[int(drafted)]
        return tokens / seconds

    def draft(self, batch_size: int) -> bool:
        """Whether the next step at this batch size should draft (each row's own k still applies)."""
        if batch_size < self.min_batch:
            return True
        b = self.bucket(batch_size)
        n = self.steps.get(b, 0)
        self.steps[b] = n + 1
        drafting, plain = self.rate(batch_size, True), self.rate(batch_size, False)
        if drafting is None or plain is None:  # learning: runs of each side in turn, drafting first
            return (n // self.run) % 2 == 0
        better = drafting >= plain
        return better if n % self.explore_every else not better

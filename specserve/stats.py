"""Per-request speculative decoding statistics, named as vLLM names them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters and timings of one request (or a sum over requests).

    mean_accepted_length = 1 + num_accepted_tokens / num_drafts: tokens committed per
    verified draft block, counting the recovered or bonus token.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    num_steps: int = 0  # target passes after prefill, with or without a draft
    num_pipelined_drafts: int = 0  # drafts drafted during the previous verification (the overlap paid)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0

    def record(self, num_draft: int, num_accepted: int) -> None:
        """Account for one verification step that checked ``num_draft`` tokens and accepted ``num_accepted``."""
        self.num_steps += 1
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        _grow(self.accepted_per_position, num_draft)
        _grow(self.drafted_per_position, num_draft)
        for i in range(num_draft):
            self.drafted_per_position[i] += 1
            if i < num_accepted:
                self.accepted_per_position[i] += 1

    def merge(self, other: SpecStats) -> None:
        """Add another request's counters into this one."""
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_steps", "num_pipelined_drafts",
                     "draft_time_s", "verify_time_s", "prefill_time_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.accepted_per_position, other.accepted_per_position),
                             (self.drafted_per_position, other.drafted_per_position)):
            _grow(mine, len(theirs))
            for i, v in enumerate(theirs):
                mine[i] += v

    @property
    def mean_accepted_length(self) -> float:
        """1 + accepted / drafts (1.0 when nothing was drafted)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_by_position(self) -> list[float]:
        """Share of drafts whose token at position i (0-based) was accepted, among drafts that long."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def to_dict(self) -> dict:
        """JSON-ready dict with the derived figures included."""
        d = asdict(self)
        d["mean_accepted_length"] = self.mean_accepted_length
        d["acceptance_rate"] = self.acceptance_rate
        d["acceptance_by_position"] = self.acceptance_by_position()
        return d


def _grow(values: list[int], n: int) -> None:
    if len(values) < n:
        values.extend([0] * (n - len(values)))

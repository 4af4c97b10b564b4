"""The learning curve of a distillation run: training terms against tokens seen, and measured stretches.

``log.jsonl`` (one object per step) gives the training side: soft cross-entropy and the greedy
accepted length on training blocks (leading positions whose argmax is the target's). Stretches
(``stretches.jsonl``, one object per evaluated checkpoint: tokens seen and the mean accepted length
measured by ``eval-drafter`` on held-out prompts) give the serving side.
"""

from __future__ import annotations

import json
from pathlib import Path

from specserve.plotting import figure

STRETCHES = "stretches.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curve(run_dir: Path, png: Path, window: int = 20) -> Path:
    """Draw the run's learning curve to ``png``: CE and accepted lengths against tokens seen."""
    log = read_jsonl(Path(run_dir) / "log.jsonl")
    stretches = read_jsonl(Path(run_dir) / STRETCHES)
    with figure(png, figsize=(9, 4), ncols=2) as (_, (ax_ce, ax_acc)):
        tokens = [r["tokens_seen"] / 1e6 for r in log]
        ax_ce.plot(tokens, smooth([r["ce"] for r in log], window), label="soft CE (nats)")
        ax_ce.set_xlabel("target tokens seen (millions)")
        ax_ce.set_title("training loss")
        ax_ce.legend()
        ax_acc.plot(tokens, smooth([r["greedy_accepted"] for r in log], window), label="train: greedy accepted / block")
        if stretches:
            ax_acc.plot([s["tokens_seen"] / 1e6 for s in stretches], [s["mean_accepted_length"] - 1 for s in stretches],
                        "o-", label="held-out: accepted / block (MAL - 1)")
        ax_acc.set_xlabel("target tokens seen (millions)")
        ax_acc.set_title("accepted draft tokens per block")
        ax_acc.legend()
    return Path(png)

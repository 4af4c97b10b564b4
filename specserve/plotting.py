"""One way to draw a figure to a PNG file (headless, same size and resolution everywhere)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: Path | str, figsize: tuple[float, float] = (7, 4.5), **subplots: object) -> Iterator[tuple]:
    """``with figure(path) as (fig, ax): ...`` draws, then lays out, saves and closes the figure.

    ``subplots`` go to ``plt.subplots`` (``nrows``, ``ncols``, ``sharey``, ``squeeze``...).
    Nothing is written if the body raises.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=figsize, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)

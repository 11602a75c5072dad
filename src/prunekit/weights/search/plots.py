"""The search's plot: the ratio each unit got (matplotlib imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_unit_ratios(names: Sequence[str], ratios: Sequence[float], start: Sequence[float] | None,
                     path: str | Path, title: str) -> None:
    """Bars: each unit's ratio in model order; a line: where the search started (the knapsack or uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.12 + 4), 4))
    xs = range(len(names))
    colours = ["#4c72b0" if "attn" in name or "attention" in name else "#55a868" for name in names]
    ax.bar(xs, [r * 100 for r in ratios], width=0.9, color=colours, label="chosen")
    if start is not None:
        ax.plot(xs, [r * 100 for r in start], color="#dd8452", linewidth=1.2, marker=".", label="start")
    ax.set_xlabel("unit (model order; blue: attention, green: MLP or other)")
    ax.set_ylabel("ratio removed (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_title(title)
    ax.legend(loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

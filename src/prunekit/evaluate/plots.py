"""Plots written as PNG files (matplotlib without a display)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_unit_ratios(names: Sequence[str], ratios: Sequence[float], start: Sequence[float] | None,
                     path: str | Path, title: str) -> None:
    """Bars: each unit's ratio in model order; a line: where the search started (the knapsack or uniform)."""
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.12 + 4), 4))
    xs = range(len(names))
    colours = ["#4c72b0" if "attn" in name or "attention" in name else "#55a868" for name in names]
    ax.bar(xs, [r * 100 for r in ratios], width=0.9, color=colours, label="chosen")
    if start is not None:
        ax.plot(xs, [r * 100 for r in start], color="#dd8452", linewidth=1.2, marker=".", label="start")
    _finish_percent_bars(fig, ax, len(names), "unit (model order; blue: attention, green: MLP or other)",
                         "ratio removed (%)", title, path)


def plot_layer_sparsity(names: Sequence[str], target: Sequence[float], achieved: Sequence[float],
                        path: str | Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.05 + 4), 4))
    xs = range(len(names))
    ax.bar(xs, [a * 100 for a in achieved], width=1.0, color="#4c72b0", label="achieved")
    ax.plot(xs, [t * 100 for t in target], color="#dd8452", linewidth=1.2, label="allocated")
    _finish_percent_bars(fig, ax, len(names), "layer (execution order)", "sparsity (%)", title, path)


def _finish_percent_bars(fig, ax, count: int, xlabel: str, ylabel: str, title: str, path: str | Path) -> None:
    """Labels, a 0–100 % axis over ``count`` bars, the legend, and the atomic save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, count - 0.5)
    ax.set_title(title)
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str,
                ylabel: str, title: str, log_y: bool = False, reference: tuple[str, float] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle="--", label=reference[0])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)

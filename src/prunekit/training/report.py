"""Reports of sparse training: FLOPs of the sparse model, per-layer sparsity over training, plots.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts the dense forward pass of one example,
attributed to each layer; the *theoretical* sparse FLOPs scale every sparsified layer's count by
its density (share of weights kept) and leave the rest as is. Dense kernels do not skip zeros, so
this is what a sparse kernel could reach, not what PyTorch runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.training.base import Sparsifier

FLOPS_NOTE = ("FLOPs are counted by torch.utils.flop_counter.FlopCounterMode for one example's forward pass "
              "(multiply-adds count as 2). Sparse FLOPs are theoretical: each sparsified layer's dense count times "
              "its density; dense kernels still run every multiply, so unstructured sparsity does not make the "
              "CPU forward faster.")


def layer_flops(model: nn.Module, example_input: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Dense forward FLOPs of ``model`` on ``example_input``: the total and per named module."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example_input)
    model.train(was_training)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global" or not key.startswith(root + "."):
            continue
        per_module[key[len(root) + 1:]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def sparse_flops(model: nn.Module, example_input: torch.Tensor, densities: dict[str, float]) -> dict:
    """Dense and theoretical sparse forward FLOPs, per sparsified layer and in total."""
    total, per_module = layer_flops(model, example_input)
    layers = {}
    saved = 0.0
    for name, density in densities.items():
        dense = per_module.get(name, 0)
        layers[name] = {"dense": dense, "sparse": dense * density, "density": density}
        saved += dense * (1 - density)
    sparse_total = total - saved
    return {"dense": total, "sparse": sparse_total, "ratio": sparse_total / total if total else 1.0,
            "layers": layers, "note": FLOPS_NOTE}


def densities(sparsifier: Sparsifier | None, model: nn.Module) -> dict[str, float]:
    if sparsifier is not None:
        return {name: 1 - s for name, s in sparsifier.layer_sparsity().items()}
    from prunekit.training.base import select_layers

    return {name: float(torch.count_nonzero(module.weight)) / module.weight.numel()
            for name, module in select_layers(model)}


def sparsity_curves(history: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per-layer sparsity (%) against step, from a sparsifier's history of mask changes."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for record in history:
        for name, value in record["layers"].items():
            steps, values = curves.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(100 * value)
    return curves


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_sparsity_over_training(history: Sequence[dict], path: str | Path, title: str, total_steps: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (steps, values) in sparsity_curves(history).items():
        if total_steps is not None and steps and steps[-1] < total_steps:
            steps, values = steps + [total_steps], values + [values[-1]]
        ax.step(steps, values, where="post", label=name)
    overall_steps = [r["step"] for r in history]
    overall = [100 * r["sparsity"] for r in history]
    if total_steps is not None and overall_steps and overall_steps[-1] < total_steps:
        overall_steps, overall = overall_steps + [total_steps], overall + [overall[-1]]
    ax.step(overall_steps, overall, where="post", color="black", linewidth=2.2, label="all sparsified layers")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(-2, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def plot_accuracy_vs_sparsity(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                              path: str | Path, title: str, dense: tuple[float, float] | None = None) -> None:
    """One line per method: (sparsities %, mean accuracy %, std), with the dense mean ± std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Two panels: the whole range (collapses show), and a zoom on the top where most methods sit.
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for ax in axes:
        for index, (label, (xs, means, stds)) in enumerate(series.items()):
            ax.errorbar(xs, means, yerr=stds, marker=markers[index % len(markers)], capsize=3, label=label,
                        color=colors[index % len(colors)])
        if dense is not None:
            ax.axhline(dense[0], color="grey", linestyle="--", label="dense")
            ax.axhspan(dense[0] - dense[1], dense[0] + dense[1], color="grey", alpha=0.15)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    top = max(max(means) for _, means, _ in series.values()) if series else 100.0
    if dense is not None:
        top = max(top, dense[0])
    axes[1].set_ylim(top - 8, top + 1)
    axes[0].set_title(title)
    axes[1].set_title("zoom on the top 8 points")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def plot_training(epochs: Sequence[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(epochs) + 1))
    ax.plot(xs, [e.get("loss") for e in epochs], marker="o", label="training loss")
    ax.set_xlabel("epoch (all rounds)")
    ax.set_ylabel("mean training loss")
    if any("test_accuracy" in e for e in epochs):
        twin = ax.twinx()
        twin.plot(xs, [100 * e["test_accuracy"] if e.get("test_accuracy") is not None else None for e in epochs],
                  color="#dd8452", marker="s", label="test accuracy")
        twin.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)

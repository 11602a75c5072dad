"""Shared by the token-reduction benchmarks: resumable result files, tables, orderings and plots.

Every group of points (one method, or one method at one schedule) is measured together with its
own unpatched baseline in the same process, so speed-ups never compare timings taken minutes apart
under different machine load. Results accumulate in benchmarks/results/<name>.json; re-running a
group replaces it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LOCK_NOTE = ("Timings were taken with `torch.set_num_threads(2)` while holding /tmp/prunekit-cpu.lock; the machine "
             "is shared, and the one-minute load average before and after each timed batch is stored in the JSON.")


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"groups": {}}


def save(name: str, data: dict[str, Any]) -> None:
    from prunekit.evaluate.report import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", data)


def measure_group(name: str, label: str, model: torch.nn.Module, task: Any, method: str, ratios: Sequence[float],
                  layers: Sequence[int] | None = None, options: dict[str, Any] | None = None,
                  batch_sizes: Sequence[int] = (1, 32), repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    from prunekit.tokens.evaluation import SweepSettings, run_sweep

    settings = SweepSettings(methods=[method], ratios=list(ratios), batch_sizes=list(batch_sizes), warmup=warmup,
                             repeats=repeats, layers=list(layers) if layers is not None else None,
                             options={method: dict(options or {})}, threads=2)
    result = run_sweep(model, task, settings)
    data = load(name)
    data["groups"][label] = {"label": label, "method": method, **result}
    save(name, data)
    return result


def ratio_of(point: dict[str, Any]) -> float:
    """A point's ratio; results stored before the rename call it ``rate``."""
    return point["ratio"] if "ratio" in point else point["rate"]


def points(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, group in data["groups"].items():
        for point in group["points"]:
            rows.append({**point, "ratio": ratio_of(point), "label": label})
    return rows


def table(data: dict[str, Any], metric: str, sizes: Sequence[str], scale: float = 1.0, digits: int = 4) -> str:
    from prunekit.evaluate.report import markdown_table

    headers = ["method", "ratio", "reducing blocks", "tokens at the end", metric, f"Δ {metric}"]
    for size in sizes:
        headers += [f"items/s b{size}", f"speed-up b{size}"]
    headers += ["GFLOPs/item", "FLOPs ratio"]
    rows = []
    for label, group in data["groups"].items():
        base = group["baseline"]
        rows.append([f"{label}: unpatched", "–", "–", _first_tokens(group), round(base["quality"][metric] * scale, digits),
                     "–", *[v for size in sizes for v in (round(base["throughput"][size]["items_per_second"], 1), "1.00")],
                     round(base["flops_per_item"] / 1e9, 4), "1.000"])
        for point in group["points"]:
            rows.append([label, ratio_of(point), ",".join(map(str, point["patch"]["layers"])),
                         round(point["tokens"]["tokens_out"], 1), round(point["quality"][metric] * scale, digits),
                         f"{point['quality_change'] * scale:+.{digits}f}",
                         *[v for size in sizes for v in (round(point["throughput"][size]["items_per_second"], 1),
                                                         f"{point['speedup'][size]:.2f}")],
                         round(point["flops_per_item"] / 1e9, 4), f"{point['flops_ratio']:.3f}"])
    return markdown_table(headers, rows)


def _first_tokens(group: dict[str, Any]) -> Any:
    return round(group["points"][0]["tokens"]["tokens_in"], 1) if group["points"] else "–"


def ordering(data: dict[str, Any], metric: str, speedups: Sequence[float], size: str, higher_is_better: bool,
             scale: float = 1.0, digits: int = 4) -> str:
    """Each method's quality interpolated at equal measured speed-ups, best first at the first speed-up."""
    from prunekit.evaluate.report import markdown_table
    from prunekit.tokens.evaluation import quality_at_speedup

    rows = []
    for label, group in data["groups"].items():
        # the unpatched model is the curve's start: speed-up 1 at its own quality
        start = {"method": group["method"], "speedup": {size: 1.0}, "quality": group["baseline"]["quality"]}
        curve = [start, *group["points"]]
        values = [quality_at_speedup(curve, group["method"], metric, speedup, size) for speedup in speedups]
        rows.append([label, *[None if v is None else round(v * scale, digits) for v in values]])
    sign = -1 if higher_is_better else 1
    rows.sort(key=lambda row: (row[1] is None, sign * (row[1] or 0)))
    return markdown_table(["method", *[f"{metric} at {s:g}× (b{size})" for s in speedups]], rows)


def plot(data: dict[str, Any], metric: str, size: str, path: Path, title: str, scale: float = 1.0,
         log_y: bool = False) -> None:
    from prunekit.evaluate.plots import plot_curves

    curves = {}
    reference = None
    for label, group in data["groups"].items():
        xs = [1.0] + [p["speedup"][size] for p in group["points"]]
        ys = [group["baseline"]["quality"][metric] * scale] + [p["quality"][metric] * scale for p in group["points"]]
        curves[label] = (xs, ys)  # in order of ratio, from the unpatched model: a slower point stays visible as such
        reference = reference or ("unpatched", group["baseline"]["quality"][metric] * scale)
    plot_curves(curves, path, xlabel=f"measured throughput relative to the unpatched model (batch {size})",
                ylabel=metric, title=title, log_y=log_y, reference=reference)


def cli(run_part: Callable[[list[str]], None], render: Callable[[], None], groups: Sequence[str],
        argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure groups (default: all) and store them")
    run.add_argument("groups", nargs="*", help=f"any of: {', '.join(groups)}")
    sub.add_parser("report", help="write the Markdown table and the plot from the stored results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "run":
        unknown = [g for g in args.groups if g not in groups]
        if unknown:
            parser.error(f"unknown groups {unknown}; choose from {list(groups)}")
        run_part(args.groups or list(groups))
    render()
    return 0


if __name__ == "__main__":
    sys.exit("import this module from a benchmark script")

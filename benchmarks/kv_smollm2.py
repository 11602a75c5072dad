"""Benchmark: prunekit's kv-cache compression against KVPress on SmolLM2-135M, side by side (run by hand, under the
CPU lock: ``flock /tmp/prunekit-cpu.lock python benchmarks/kv_smollm2.py``).

KVPress pins transformers < 5.3, so it runs in its own virtual environment (``--kvpress-python``, default
/work/venvs/kvpress/bin/python: ``python -m venv``, ``pip install torch==2.13.0`` first, then ``pip install
kvpress``); each tool runs in its own process (``benchmarks/kv_worker.py``) with the same threads, on the same
prompts, methods and ratios:

- kept positions: per prompt, ratio, block and key head, the share of KVPress's kept positions that prunekit
  also keeps (both keep the same count);
- quality: the mean loss of the next ``--continuation`` tokens of each prompt's wiki article through the
  compressed cache, the same code for both (perplexity = exp(mean over prompts));
- prefill time: in four processes alternating kvpress, prunekit, prunekit, kvpress (ABBA), each process times
  many prefills of the first prompt: ``--warmup`` untimed rounds, then ``--repeats`` rounds of one full-cache
  prefill followed by one prefill per (method, ratio) cell. Per cell and tool: the median of its samples (two
  processes x repeats), its overhead over the full-cache prefill of the same processes (per process: cell median
  / full median, then the median of the two), and the ratios prunekit / KVPress of both.

``--modes`` picks quality, timing or both; ``--merge`` folds this run's cells into an existing report (the other
cells and measurements stay), so a long sweep can run as several invocations under the lock, e.g.
``--modes timing --methods snapkv,knorm,streaming_llm --ratios 0.5 --merge`` then ``--modes timing --methods
tova,expected_attention --ratios 0.5 --merge`` (about 6.5 and 5 minutes on 2 threads). The Markdown is rendered
from the whole JSON.

Writes benchmarks/results/kv_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["snapkv", "knorm", "streaming_llm", "tova", "expected_attention"]
DETERMINISTIC = METHODS  # none of the five draws random numbers


def worker(python: str, tool: str, model: str, prompts: Path, mode: str, methods: list[str], ratios: list[float],
           threads: int, directory: Path, tag: str, warmup: int = 1, repeats: int = 5) -> dict:
    import torch

    out = directory / f"{tool}-{mode}-{tag}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = [python, str(HERE / "kv_worker.py"), "--tool", tool, "--model", model, "--prompts", str(prompts),
               "--methods", ",".join(methods), "--ratios", ",".join(map(str, ratios)), "--mode", mode,
               "--threads", str(threads), "--warmup", str(warmup), "--repeats", str(repeats), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tool} {mode} failed:\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def agreement(ours: dict, theirs: dict) -> list[float]:
    shares = []
    for layer, positions in theirs.items():
        for head in range(positions.shape[0]):
            reference = set(positions[head].tolist())
            shares.append(len(reference & set(ours[layer][head].tolist())) / len(reference))
    return shares


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=4, method="inclusive")
    return cuts[0], cuts[2]


def cell_timing(timings: dict[str, list[dict]], key: str) -> dict:
    """One cell's prefill timing per tool from its processes, and the two ratios prunekit / KVPress."""
    cell: dict = {}
    for tool, runs in timings.items():
        samples = [run["points"][key] for run in runs]
        fulls = [run["full_seconds"] for run in runs]
        overheads = [statistics.median(s) / statistics.median(f) for s, f in zip(samples, fulls)]
        flat = [x for s in samples for x in s]
        cpu = [x for run in runs for x in run["points_cpu"][key]]
        cell[tool] = {"samples": samples, "median_s": statistics.median(flat), "quartiles_s": quartiles(flat),
                      "full_median_s": statistics.median(x for f in fulls for x in f),
                      "overhead_per_process": overheads, "overhead": statistics.median(overheads),
                      "cpu_median_s": statistics.median(cpu),
                      "full_cpu_median_s": statistics.median(x for run in runs for x in run["full_cpu_seconds"])}
    cell["ratio"] = cell["prunekit"]["median_s"] / cell["kvpress"]["median_s"]
    cell["overhead_ratio"] = cell["prunekit"]["overhead"] / cell["kvpress"]["overhead"]
    cell["cpu_ratio"] = cell["prunekit"]["cpu_median_s"] / cell["kvpress"]["cpu_median_s"]
    return cell


def spread(values: list[float]) -> dict:
    low, high = quartiles(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": low, "q3": high,
            "cells": len(values)}


def upgrade(report: dict) -> dict:
    """A report written before timing and quality were separate runs: its single-prefill timings are dropped."""
    if "runs" in report:
        report["quality_runs"] = [{"methods": run["methods"], "full_perplexity": run["full_perplexity"]}
                                  for run in report.pop("runs")]
        for point in report["points"]:
            point.pop("prefill_seconds", None)
            point.pop("overhead_over_full", None)
        report.pop("prefill_time_ratio_median", None)
        report.pop("note", None)
    report.setdefault("quality_runs", [])
    report.setdefault("timing_runs", [])
    return report


def summarise(report: dict) -> None:
    timed = [p["timing"] for p in report["points"] if "timing" in p]
    if timed:
        report["prefill_time"] = {"ratio": spread([t["ratio"] for t in timed]),
                                  "overhead_ratio": spread([t["overhead_ratio"] for t in timed]),
                                  "cpu_ratio": spread([t["cpu_ratio"] for t in timed])}


def render(report: dict) -> str:
    from prunekit.evaluate.report import markdown_table

    rows = []
    for point in report["points"]:
        quality = "perplexity" in point
        timing = point.get("timing")
        full = next((run["full_perplexity"]["prunekit"] for run in reversed(report["quality_runs"])
                     if point["method"] in run["methods"] and point["ratio"] in run.get("ratios", [point["ratio"]])),
                    None)
        rows.append([point["method"], f"{point['ratio']:g}",
                     f"{point['agreement_mean']:.2%}" if quality else "",
                     f"{point['agreement_min']:.2%}" if quality else "",
                     f"{point['perplexity']['prunekit']:.3f}" if quality else "",
                     f"{point['perplexity']['kvpress']:.3f}" if quality else "",
                     f"{point['perplexity']['prunekit'] / full - 1:+.1%}" if quality and full else "",
                     f"{timing['prunekit']['median_s']:.3f}" if timing else "",
                     f"{timing['kvpress']['median_s']:.3f}" if timing else "",
                     f"{timing['ratio']:.3f}" if timing else "",
                     f"{timing['prunekit']['overhead']:.3f}" if timing else "",
                     f"{timing['kvpress']['overhead']:.3f}" if timing else "",
                     f"{timing['overhead_ratio']:.3f}" if timing else "",
                     f"{timing['prunekit']['cpu_median_s']:.2f} / {timing['kvpress']['cpu_median_s']:.2f}"
                     if timing else "", f"{timing['cpu_ratio']:.3f}" if timing else ""])
    table = markdown_table(["method", "ratio", "kept positions agree (mean)", "(worst head)", "perplexity prunekit",
                            "perplexity KVPress", "vs full cache", "prefill s prunekit", "prefill s KVPress",
                            "time ratio", "prefill / full, prunekit", "prefill / full, KVPress", "overhead ratio",
                            "CPU s prunekit / KVPress", "CPU ratio"], rows)
    lines = ["# KV-cache compression: prunekit against KVPress on SmolLM2-135M", ""]
    fulls = sorted({f"{run['full_perplexity']['prunekit']:.3f} / {run['full_perplexity']['kvpress']:.3f}"
                    for run in report["quality_runs"]})
    if fulls:
        lines += [f"Full cache perplexity (prunekit's process / KVPress's): {'; '.join(fulls)}.", ""]
    for run in report["quality_runs"]:
        at = f" at {', '.join(map(str, run['ratios']))}" if run.get("ratios") else ""
        lines.append(f"- quality run {', '.join(run['methods'])}{at}: one invocation under the lock")
    for run in report["timing_runs"]:
        full = ", ".join(f"{tool} {statistics.median(run['full_median_s'][tool]):.3f} s"
                         for tool in ("prunekit", "kvpress"))
        lines.append(f"- timing run {', '.join(run['methods'])} at {', '.join(map(str, run['ratios']))}: processes "
                     f"{' '.join(run['order'])}, {run['repeats']} timed rounds after {run['warmup']} warm-up; "
                     f"full-cache prefill medians (per process, median) {full}"
                     + (f"; 1-minute load average at each process's start and end (the machine has other users): "
                        + "; ".join(f"{tool} " + ", ".join(f"{b[0]:.1f}→{a[0]:.1f}"
                                                           for b, a in run["load_average"][tool])
                                    for tool in ("kvpress", "prunekit")) if run.get("load_average") else ""))
    summary = report.get("prefill_time")
    if summary:
        r, o = summary["ratio"], summary["overhead_ratio"]
        lines += ["", f"Prefill time prunekit / KVPress over {r['cells']} cells: median {r['median']:.3f} (quartiles "
                  f"{r['q1']:.3f}–{r['q3']:.3f}, range {r['min']:.3f}–{r['max']:.3f}). Each tool's prefill over "
                  "its "
                  f"own full-cache prefill, prunekit's / KVPress's (the overhead ratio, which takes out the two "
                  f"processes' transformers versions and speeds): median {o['median']:.3f} (quartiles {o['q1']:.3f}–"
                  f"{o['q3']:.3f}, range {o['min']:.3f}–{o['max']:.3f}). Process CPU seconds of the prefill, "
                  f"prunekit / KVPress: median {summary['cpu_ratio']['median']:.3f} (range "
                  f"{summary['cpu_ratio']['min']:.3f}–{summary['cpu_ratio']['max']:.3f})."]
        fulls = [(tool, run["full_median_s"][tool]) for run in report["timing_runs"] for tool in ("prunekit", "kvpress")
                 if len(run["full_median_s"][tool]) > 1]
        if fulls:
            gap = max(max(v) / min(v) - 1 for _, v in fulls)
            lines += ["", f"Noise: the two processes of one tool differed in their full-cache prefill median by up to "
                      f"{gap:.0%}, so per-cell differences of a few per cent are below what this machine resolves."]
    untimed = [f"{p['method']}@{p['ratio']:g}" for p in report["points"] if "timing" not in p]
    lines += ["", table, "", "Timing columns: medians of every sample of the cell (two processes per tool x the "
              "timed rounds); 'prefill / full' is per process the cell's median over the same process's full-cache "
              "median, the median over the tool's processes; time ratio and overhead ratio are prunekit / KVPress; "
              "CPU s: the process's CPU seconds (both threads) of one prefill, median."
              + (f" Not timed with this protocol: {', '.join(untimed)} (blank timing columns)." if untimed else ""),
              ""]
    lines += [f"- {k}: {v}" for k, v in report["protocol"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress-python", default="/work/venvs/kvpress/bin/python")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default="quality,timing", help="quality, timing or both")
    parser.add_argument("--warmup", type=int, default=1, help="timing: untimed rounds per process")
    parser.add_argument("--repeats", type=int, default=5, help="timing: timed rounds per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="fold this run into the existing report at --out")
    parser.add_argument("--out", default=str(HERE / "results" / "kv_smollm2"))
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from prunekit.evaluate.report import environment
    from prunekit.kv.evaluation import KVProtocol, long_articles
    from prunekit.models.assets import smollm2_path

    model = str(smollm2_path())
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    modes = set(args.modes.split(","))
    if not modes or not modes <= {"quality", "timing"}:
        raise SystemExit(f"--modes takes quality and/or timing, got {args.modes!r}")
    tokenizer = AutoTokenizer.from_pretrained(model)
    length = args.prompt_tokens + args.continuation
    articles = long_articles(tokenizer, KVProtocol(), length)[:args.prompts]
    python = {"prunekit": sys.executable, "kvpress": args.kvpress_python}
    order = ("kvpress", "prunekit", "prunekit", "kvpress")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        prompts = directory / "prompts.pt"
        torch.save([(a[:, :args.prompt_tokens], a[:, args.prompt_tokens:]) for a in articles], prompts)
        run = lambda tool, mode, tag: worker(python[tool], tool, model, prompts, mode, methods, ratios,  # noqa: E731
                                             args.threads, directory, tag, args.warmup, args.repeats)
        quality = {tool: run(tool, "quality", "q") for tool in ("kvpress", "prunekit")} if "quality" in modes else None
        timings: dict[str, list[dict]] = {"kvpress": [], "prunekit": []}
        if "timing" in modes:
            for number, tool in enumerate(order):
                timings[tool].append(run(tool, "timing", str(number)))
    out = Path(args.out)
    existing = out.with_suffix(".json")
    report = upgrade(json.loads(existing.read_text())) if args.merge and existing.exists() else \
        {"quality_runs": [], "timing_runs": [], "points": []}
    report["protocol"] = {
        "model": "SmolLM2-135M-Instruct fp32, sdpa", "prompts": len(articles), "prompt_tokens": args.prompt_tokens,
        "continuation_tokens": args.continuation,
        "articles": f"the first wiki test-split articles (last 20 % by article) of at least {length} tokens",
        "threads": args.threads,
        "timing": f"prefills of the first prompt in each of four processes (kvpress, prunekit, prunekit, kvpress); per "
                  f"process {args.warmup} untimed round then {args.repeats} timed rounds, a round being one full-cache "
                  "prefill then one prefill per (method, ratio) cell (cells forward on even rounds, backward on odd); "
                  "per cell the median of the tool's samples, and per process the cell's median over the full-cache "
                  "median",
        "kvpress": "kvpress 0.5.5, transformers 5.2 in its own venv; prunekit on transformers 5.25"}
    points = {(p["method"], p["ratio"]): p for p in report["points"]}
    cells = {(method, ratio) for method in methods for ratio in ratios}
    if quality is not None:
        full = {tool: math.exp(statistics.fmean(quality[tool]["full_losses"])) for tool in quality}
        report["quality_runs"] = [r for r in report["quality_runs"] if not set(r["methods"]) <= set(methods)]
        report["quality_runs"].append({"methods": sorted(methods), "ratios": ratios, "full_perplexity": full})
        for method, ratio in sorted(cells):
            shares, losses = [], {"kvpress": [], "prunekit": []}
            for number in range(len(articles)):
                key = f"{number}:{method}@{ratio}"
                shares += agreement(quality["prunekit"]["points"][key]["positions"],
                                    quality["kvpress"]["points"][key]["positions"])
                for tool in losses:
                    losses[tool].append(quality[tool]["points"][key]["loss"])
            point = points.setdefault((method, ratio), {"method": method, "ratio": ratio})
            point.update({"agreement_mean": statistics.fmean(shares), "agreement_min": min(shares),
                          "perplexity": {tool: math.exp(statistics.fmean(v)) for tool, v in losses.items()}})
    if "timing" in modes:
        report["timing_runs"] = [r for r in report["timing_runs"]
                                 if not (set(r["methods"]) <= set(methods) and set(r["ratios"]) <= set(ratios))]
        report["timing_runs"].append({"methods": methods, "ratios": ratios, "order": list(order),
                                      "warmup": args.warmup, "repeats": args.repeats,
                                      "full_median_s": {tool: [statistics.median(t["full_seconds"]) for t in runs]
                                                        for tool, runs in timings.items()},
                                      "load_average": {tool: [[t["load_before"], t["load_after"]] for t in runs]
                                                       for tool, runs in timings.items()}})
        for method, ratio in cells:
            point = points.setdefault((method, ratio), {"method": method, "ratio": ratio})
            point["timing"] = cell_timing(timings, f"{method}@{ratio}")
    rank = {name: number for number, name in enumerate(METHODS)}
    report["points"] = sorted(points.values(),
                              key=lambda p: (rank.get(p["method"], len(rank)), p["method"], p["ratio"]))
    summarise(report)
    report["environment"] = environment()
    markdown = render(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

"""Does a refactor change what one-shot pruning gives or what it costs? Two checkouts, paired runs.

Runs ``prunekit prune`` on the embedded SmolLM2-135M with the pinned wiki protocol from two source trees
(``--before`` and ``--after``, each a ``src`` directory), alternating the order every repeat so that drift
of the machine falls on both equally. Each run is a fresh process with the same threads; the figures are
read from each run's report.json: perplexity after pruning (must be identical: same data, same seed,
same arithmetic), pruning seconds and peak RSS while pruning (medians over the repeats).

    git worktree add /tmp/prunekit-before <commit>
    flock /tmp/prunekit-cpu.lock python benchmarks/refactor_before_after.py \
        --before /tmp/prunekit-before/src --after src --tag issue15

Writes benchmarks/results/refactor_before_after[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (label, method, ratio, pattern); method "shrink" is structural pruning (its default criterion) at that ratio
ROWS = [
    ("Wanda 50 %", "wanda", 0.5, None),
    ("SparseGPT 50 %", "sparsegpt", 0.5, None),
    ("SparseGPT 2:4", "sparsegpt", 0.5, "2:4"),
    ("Shrink 20 %", "shrink", 0.2, None),
]


def _ratio_option(source: Path) -> str:
    """The option naming the removed fraction in that checkout (renamed from --sparsity to --ratio)."""
    text = (source / "prunekit" / "cli" / "weights.py").read_text()
    return "--ratio" if '"--ratio"' in text or "ratio: Optional[float]" in text else "--sparsity"


def run_once(source: Path, method: str, ratio: float, pattern: str | None, threads: int, out: Path) -> dict:
    if method == "shrink":  # speed timed briefly: the row compares pruning, not inference
        command = [sys.executable, "-m", "prunekit", "shrink", "--ratio", str(ratio), "--out", str(out),
                   "--overwrite", "--threads", str(threads), "--batch-sizes", "1", "--runs", "3",
                   "--no-peak-memory"]
    else:
        command = [sys.executable, "-m", "prunekit", "prune", "--method", method, "--out", str(out), "--overwrite",
                   "--threads", str(threads), "--no-compressed"]
        command += ["--pattern", pattern] if pattern else [_ratio_option(source), str(ratio)]
    env = dict(os.environ, PYTHONPATH=str(source.resolve()), PRUNEKIT_QUIET="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{source}: {' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    report = json.loads((out / "report.json").read_text())
    if method == "shrink":
        return {"perplexity": report["quality"]["after_pruning"], "dense_perplexity": report["quality"]["before"],
                "prune_seconds": report["timing"]["prune_seconds"], "parameters": report["parameters"]["after"],
                "peak_rss_mib": report["memory"]["peak_rss_during_prune_bytes"] / 2**20}
    return {"perplexity": report["perplexity"]["after"], "dense_perplexity": report["perplexity"]["before"],
            "prune_seconds": report["timing"]["prune_seconds"],
            "peak_rss_mib": report["memory"]["peak_rss_during_prune_bytes"] / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="src directory of the earlier checkout")
    parser.add_argument("--after", type=Path, required=True, help="src directory of the later checkout")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or 'all'")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    rows = ROWS if args.rows == "all" else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    sources = {"before": args.before, "after": args.after}
    runs: dict[str, dict[str, list[dict]]] = {label: {"before": [], "after": []} for label, *_ in rows}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for label, method, ratio, pattern in rows:
                order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
                for version in order:
                    result = run_once(sources[version], method, ratio, pattern, args.threads,
                                      Path(scratch) / version)
                    runs[label][version].append(result)
                    print(f"{label:16s} {version:6s} ppl {result['perplexity']:.4f} "
                          f"{result['prune_seconds']:.1f} s {result['peak_rss_mib']:.0f} MiB", flush=True)
    table = []
    for label, by_version in runs.items():
        row = {"row": label}
        for version, results in by_version.items():
            row[f"{version}_perplexity"] = results[0]["perplexity"]
            row[f"{version}_perplexities_agree"] = len({r["perplexity"] for r in results}) == 1
            row[f"{version}_prune_seconds"] = statistics.median(r["prune_seconds"] for r in results)
            row[f"{version}_peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in results)
        row["time_ratio"] = row["after_prune_seconds"] / row["before_prune_seconds"]
        table.append(row)
    protocol = (f"embedded SmolLM2-135M, prunekit prune / shrink defaults (32 calibration windows × 512 tokens of "
                f"wiki, seed 0; perplexity on the first 40 test windows of 512 tokens), fp32, {args.threads} threads, "
                f"each run a fresh process, {args.repeats} repeats alternating the order, medians")
    suffix = f"_{args.tag}" if args.tag else ""
    result = {"protocol": protocol, "before": str(args.before), "after": str(args.after), "rows": table,
              "runs": runs}
    (HERE / "results" / f"refactor_before_after{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| row | ppl before | ppl after | prune s before | prune s after | after/before | peak RSS MiB before | "
             "peak RSS MiB after |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['row']} | {row['before_perplexity']:.4f} | {row['after_perplexity']:.4f} | "
                     f"{row['before_prune_seconds']:.1f} | {row['after_prune_seconds']:.1f} | {row['time_ratio']:.2f} | "
                     f"{row['before_peak_rss_mib']:.0f} | {row['after_peak_rss_mib']:.0f} |")
    lines += ["", f"Protocol: {protocol}."]
    (HERE / "results" / f"refactor_before_after{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`prunekit prune --eval` with the dense perplexity measured (cold cache: what every run did before the
cache) and read from the cache (warm), on the embedded SmolLM2-135M, timed in alternation (ABBA).

    flock /tmp/prunekit-cpu.lock python benchmarks/dense_perplexity_cache.py [--repeats 2] [--threads 2]

The job is magnitude 50 % on the default protocol (40 test windows of 512 tokens): the pruning itself is
a second, so the difference is the dense evaluation. The cost of the model's first content digest
(hashing its safetensors once, then remembered by size and modification time) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from prunekit.core.cache import cache_dir
    from prunekit.evaluate.measure import machine_load, time_alternating
    from prunekit.evaluate.perplexity import PERPLEXITY_CACHE
    from prunekit.evaluate.report import environment, markdown_table
    from prunekit.io.digest import directory_digest
    from prunekit.models.assets import smollm2_path
    from prunekit.weights.job import PruneJob
    from prunekit.weights.recipe import WeightPruningRecipe

    model_dir = smollm2_path()
    # The digest memo lives in the user cache too: time the first hash in a scratch cache.
    scratch = tempfile.mkdtemp(prefix="digest-bench-")
    previous = os.environ.get("PRUNEKIT_CACHE")
    os.environ["PRUNEKIT_CACHE"] = scratch
    try:
        begin = time.perf_counter()
        directory_digest(model_dir)
        first_digest = time.perf_counter() - begin
        begin = time.perf_counter()
        directory_digest(model_dir)
        remembered_digest = time.perf_counter() - begin
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if previous is None:
            del os.environ["PRUNEKIT_CACHE"]
        else:
            os.environ["PRUNEKIT_CACHE"] = previous

    recipe = WeightPruningRecipe.model_validate({"model": str(model_dir), "method": "magnitude", "ratio": 0.5})
    reports: dict[str, list[dict]] = {"measured": [], "cached": []}

    def run(name: str):
        def call():
            reports[name].append(PruneJob(recipe).run().report)
        return call

    def forget():
        shutil.rmtree(cache_dir(PERPLEXITY_CACHE), ignore_errors=True)

    run("cached")()  # fills the cache (and the page cache) before timing
    reports["cached"].clear()
    load = machine_load()
    times = time_alternating({"measured": run("measured"), "cached": run("cached")}, args.repeats,
                             before={"measured": forget})
    befores = {name: {r["perplexity"]["before"] for r in runs} for name, runs in reports.items()}
    afters = {name: {r["perplexity"]["after"] for r in runs} for name, runs in reports.items()}
    assert befores["measured"] == befores["cached"] and len(befores["cached"]) == 1, befores
    assert afters["measured"] == afters["cached"] and len(afters["cached"]) == 1, afters
    assert all(r["perplexity"]["before_from_cache"] for r in reports["cached"])
    assert not any(r["perplexity"]["before_from_cache"] for r in reports["measured"])

    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    result = {"model": "SmolLM2-135M-Instruct (fp32)", "job": "prune --method magnitude --ratio 0.5 (eval on)",
              "protocol": reports["cached"][0]["protocol"], "threads": args.threads, "repeats": args.repeats,
              "order": "ABBA (time_alternating)", "seconds": times, "median_seconds": median,
              "saved_seconds": median["measured"] - median["cached"],
              "perplexity_before": befores["cached"].pop(), "perplexity_after": afters["cached"].pop(),
              "first_digest_seconds": first_digest, "remembered_digest_seconds": remembered_digest,
              "load_average_at_start": load, "environment": environment()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dense_perplexity_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [(name, f"{median[name]:.1f}", ", ".join(f"{s:.1f}" for s in times[name])) for name in times]
    (RESULTS / "dense_perplexity_cache.md").write_text(
        f"# Dense perplexity cache: {result['job']} on {result['model']}\n\n"
        + markdown_table(["dense perplexity", "median s", "runs (s)"], rows)
        + f"\n\nSaved per run: {result['saved_seconds']:.1f} s. Perplexity before {result['perplexity_before']:.4f}, "
          f"after {result['perplexity_after']:.4f}, identical in every run. First content digest of the model "
          f"({first_digest:.2f} s), remembered afterwards ({remembered_digest * 1000:.1f} ms). "
          f"{args.threads} threads, load average {load} at the start; protocol: "
          f"{result['protocol']['test_protocol']}.\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "saved_seconds", "first_digest_seconds")}, indent=1))


if __name__ == "__main__":
    main()

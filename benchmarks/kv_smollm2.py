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
- prefill time: one timed prefill per method and ratio of the first prompt per process, in four processes
  alternating kvpress, prunekit, prunekit, kvpress (ABBA); the median of each tool's two.

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
           threads: int, directory: Path, tag: str) -> dict:
    import torch

    out = directory / f"{tool}-{mode}-{tag}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = [python, str(HERE / "kv_worker.py"), "--tool", tool, "--model", model, "--prompts", str(prompts),
               "--methods", ",".join(methods), "--ratios", ",".join(map(str, ratios)), "--mode", mode,
               "--threads", str(threads), "--out", str(out)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress-python", default="/work/venvs/kvpress/bin/python")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "kv_smollm2"))
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from prunekit.evaluate.report import environment, markdown_table
    from prunekit.kv.evaluation import KVProtocol, long_articles
    from prunekit.models.assets import smollm2_path

    model = str(smollm2_path())
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(model)
    length = args.prompt_tokens + args.continuation
    articles = long_articles(tokenizer, KVProtocol(), length)[:args.prompts]
    python = {"prunekit": sys.executable, "kvpress": args.kvpress_python}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        prompts = directory / "prompts.pt"
        torch.save([(a[:, :args.prompt_tokens], a[:, args.prompt_tokens:]) for a in articles], prompts)
        run = lambda tool, mode, tag: worker(python[tool], tool, model, prompts, mode, methods, ratios,  # noqa: E731
                                             args.threads, directory, tag)
        quality = {tool: run(tool, "quality", "q") for tool in ("kvpress", "prunekit")}
        timings: dict[str, list[dict]] = {"kvpress": [], "prunekit": []}
        for number, tool in enumerate(("kvpress", "prunekit", "prunekit", "kvpress")):
            timings[tool].append(run(tool, "timing", str(number)))
    rows, points = [], []
    full = {tool: math.exp(statistics.fmean(quality[tool]["full_losses"])) for tool in quality}
    for method in methods:
        for ratio in ratios:
            shares, losses = [], {"kvpress": [], "prunekit": []}
            for number in range(len(articles)):
                key = f"{number}:{method}@{ratio}"
                shares += agreement(quality["prunekit"]["points"][key]["positions"],
                                    quality["kvpress"]["points"][key]["positions"])
                for tool in losses:
                    losses[tool].append(quality[tool]["points"][key]["loss"])
            seconds = {tool: statistics.median(t["points"][f"{method}@{ratio}"] for t in timings[tool])
                       for tool in timings}
            point = {"method": method, "ratio": ratio, "agreement_mean": statistics.fmean(shares),
                     "agreement_min": min(shares),
                     "perplexity": {tool: math.exp(statistics.fmean(v)) for tool, v in losses.items()},
                     "prefill_seconds": seconds}
            points.append(point)
            rows.append([method, f"{ratio:g}", f"{point['agreement_mean']:.2%}", f"{point['agreement_min']:.2%}",
                         f"{point['perplexity']['prunekit']:.3f}", f"{point['perplexity']['kvpress']:.3f}",
                         f"{seconds['prunekit']:.2f}", f"{seconds['kvpress']:.2f}",
                         f"{seconds['prunekit'] / seconds['kvpress']:.2f}"])
    full_seconds = {tool: statistics.median(t["full_seconds"] for t in timings[tool]) for tool in timings}
    report = {"protocol": {"model": "SmolLM2-135M-Instruct fp32, sdpa", "prompts": len(articles),
                           "prompt_tokens": args.prompt_tokens, "continuation_tokens": args.continuation,
                           "articles": "the first wiki test-split articles (last 20 % by article) of at least "
                                       f"{length} tokens", "threads": args.threads,
                           "timing": "one prefill per method and ratio of the first prompt in each of four processes "
                                     "(kvpress, prunekit, prunekit, kvpress); median of each tool's two",
                           "kvpress": "kvpress 0.5.5, transformers 5.2 in its own venv; prunekit on transformers "
                                      "5.25"},
              "full_perplexity": full, "full_prefill_seconds": full_seconds, "points": points,
              "environment": environment()}
    table = markdown_table(["method", "ratio", "kept positions agree (mean)", "(worst head)", "perplexity prunekit",
                            "perplexity KVPress", "prefill s prunekit", "prefill s KVPress", "time ratio"], rows)
    markdown = (f"# KV-cache compression: prunekit against KVPress on SmolLM2-135M\n\n"
                f"Full cache: perplexity {full['prunekit']:.3f} (prunekit's process) / {full['kvpress']:.3f} "
                f"(KVPress's); prefill {full_seconds['prunekit']:.2f} s / {full_seconds['kvpress']:.2f} s.\n\n{table}\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in report["protocol"].items()) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

"""Benchmark (c): FastV-style prefill token pruning in SmolLM2-135M (run by hand).

    python benchmarks/tokens_smollm2.py run [GROUP ...]   # measure methods (default: all), resumable
    python benchmarks/tokens_smollm2.py report

Perplexity of a 128-token continuation after a pruned 384-token prompt (8 wiki test windows),
and the prefill's time at batch 1, at several ratios (the share of the prompt kept is 1 - ratio).
"""

from __future__ import annotations

import sys

from tokens_common import LOCK_NOTE, RESULTS, cli, load, measure_group, ordering, plot, table

NAME = "tokens_smollm2"
WINDOWS = 8  # the CLI's default is 16; halved here so the whole benchmark fits a shared 2-core machine
KEEP_RATES = [0.25, 0.5, 0.75]  # keep 75 %, 50 % and 25 % of the prompt
GROUPS = {  # label: (method, ratios, layers) -- every selection rule prunes once, after block K
    "fastv@2": ("fastv", KEEP_RATES, [2]),
    "fastv@8": ("fastv", KEEP_RATES, [8]),
    "attention-magnitude@2": ("attention-magnitude", KEEP_RATES, [2]),
    "zero-tprune@2": ("zero-tprune", KEEP_RATES, [2]),
    "divprune@2": ("divprune", KEEP_RATES, [2]),
    "random@2": ("random", KEEP_RATES, [2]),
}


def run(groups: list[str]) -> None:
    from prunekit.models.loading import load_model
    from prunekit.tokens.evaluation import Prefill, PrefillProtocol

    lm = load_model()
    task = Prefill.wiki(lm.tokenizer, PrefillProtocol(windows=WINDOWS))
    for label in groups:
        method, ratios, layers = GROUPS[label]
        measure_group(NAME, label, lm.model, task, method, ratios, layers, batch_sizes=(1,), repeats=5, warmup=1)
        print(f"measured {label}", flush=True)


def render() -> None:
    data = load(NAME)
    if not data["groups"]:
        print("no results yet: run `python benchmarks/tokens_smollm2.py run`")
        return
    sizes = ["1"]
    lines = ["# Prefill token pruning in SmolLM2-135M", "",
             next(iter(data["groups"].values()))["protocol"]["text"] + ".", "",
             "Model: SmolLM2-135M-Instruct (Llama, 30 blocks), fp32, sdpa attention. The first and last prompt tokens "
             "are protected. A label `method@K` prunes once, after block K's attention; the share of the prompt kept "
             "is 1 − ratio. "
             "\"items/s\" is prompts prefilled per second (384 tokens each, key/value cache built, last logits only).",
             "", LOCK_NOTE, "", table(data, "perplexity", sizes, digits=3), "",
             "## Selection rules at equal measured prefill speed (batch 1)", "",
             ordering(data, "perplexity", [1.2, 1.5, 2.0], "1", False, digits=3), "",
             "![perplexity against measured prefill throughput](tokens_smollm2.png)", ""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    plot(data, "perplexity", "1", RESULTS / f"{NAME}.png", "SmolLM2-135M prefill pruning", log_y=True)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(cli(run, render, list(GROUPS)))

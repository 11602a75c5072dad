"""Benchmark (a): token reduction on prunekit's ViT trained on Fashion-MNIST (run by hand).

    python benchmarks/tokens_vit.py train [--max-minutes 10]   # repeat until it says "trained"
    python benchmarks/tokens_vit.py run [GROUP ...]             # measure methods (default: all), resumable
    python benchmarks/tokens_vit.py report                      # tables + plot from the stored results

Accuracy on all 10 000 Fashion-MNIST test images against measured CPU throughput at batch 1 and
32; target: at least 1.5x throughput at no more than 0.5 point accuracy loss for the best method.
"""

from __future__ import annotations

import sys

import torch

from tokens_common import LOCK_NOTE, RESULTS, cli, load, measure_group, ordering, plot, points, table

NAME = "tokens_vit"
STAGED = [0.1, 0.2, 0.3, 0.4]
GROUPS = {  # label: (method, ratios, layers)
    "tome": ("tome", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4], None),
    "evit": ("evit", STAGED, None),
    "zero-tprune": ("zero-tprune", STAGED, None),
    "attention-magnitude": ("attention-magnitude", STAGED, None),
    "divprune": ("divprune", STAGED, None),
    "random": ("random", STAGED, None),
    "fastv": ("fastv", [0.2, 0.4, 0.6], None),
}


def run(groups: list[str]) -> None:
    from prunekit.tokens.evaluation import ImageClassification
    from prunekit.models.loading import load

    model = load("fashion-vit")
    task = ImageClassification.fashion_mnist()
    for label in groups:
        method, ratios, layers = GROUPS[label]
        measure_group(NAME, label, model, task, method, ratios, layers, repeats=7, warmup=2)
        print(f"measured {label}", flush=True)


def render() -> None:
    data = load(NAME)
    if not data["groups"]:
        print("no results yet: run `python benchmarks/tokens_vit.py run`")
        return
    sizes = ["1", "32"]
    lines = ["# Token reduction on prunekit's ViT (Fashion-MNIST)", "",
             next(iter(data["groups"].values()))["protocol"]["text"] + ".", "",
             "Model: prunekit ViT, patch 4 on 28×28 (49 patches + [CLS] = 50 tokens), 6 blocks, width 192, 3 heads, "
             "MLP ratio 2, trained by `benchmarks/tokens_vit.py train` (AdamW, 3 epochs). Rate = fraction of the "
             "reducible tokens each reducing block removes; reductions happen after a block's attention, before its "
             "MLP.", "", LOCK_NOTE, "", "Accuracy in percent.", "",
             table(data, "accuracy", sizes, scale=100, digits=2), "",
             "## Methods at equal measured throughput (batch 32)", "",
             ordering(data, "accuracy", [1.25, 1.5, 2.0], "32", True, scale=100, digits=2), "",
             "## Target: at least 1.5× throughput at no more than 0.5 point accuracy loss", ""]
    for size in sizes:
        passing = [p for p in points(data) if p["speedup"][size] >= 1.5 and p["quality_change"] >= -0.005]
        if passing:
            best = max(passing, key=lambda p: p["speedup"][size])
            lines.append(f"- batch {size}: met by {len(passing)} point(s); fastest: {best['label']} at ratio "
                         f"{best['ratio']}, {best['speedup'][size]:.2f}×, accuracy change "
                         f"{best['quality_change'] * 100:+.2f} points")
        else:
            within = [p for p in points(data) if p["quality_change"] >= -0.005]
            best = max(within, key=lambda p: p["speedup"][size]) if within else None
            lines.append(f"- batch {size}: not met; the fastest point within 0.5 point is "
                         + (f"{best['label']} at ratio {best['ratio']}, {best['speedup'][size]:.2f}×" if best else "none"))
    lines += ["", "![accuracy against measured throughput](tokens_vit.png)", ""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    plot(data, "accuracy", "32", RESULTS / f"{NAME}.png", "prunekit ViT on Fashion-MNIST", scale=100)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("--max-minutes", type=float, default=10.0)
        args = parser.parse_args(argv[1:])
        torch.set_num_threads(2)
        from prunekit.tokens.vision import train_fashion_vit

        progress = train_fashion_vit(max_minutes=args.max_minutes)
        state = "trained" if progress.finished else "stopped (run again to continue)"
        print(f"{state}: {progress.parts_done}/{progress.parts} quarter epochs, losses {progress.losses} -> {progress.path}")
        return 0
    return cli(run, render, list(GROUPS), argv)


if __name__ == "__main__":
    sys.exit(main())

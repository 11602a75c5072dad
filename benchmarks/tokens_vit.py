"""Benchmark (a): token reduction on prunekit's ViT trained on Fashion-MNIST (run by hand).

    python benchmarks/tokens_vit.py train [--max-minutes 13]   # repeat until it says "trained"
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or continue training) the cached ViT")
    train.add_argument("--max-minutes", type=float, default=13.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "train":
        from prunekit.tokens.vision import train_fashion_vit

        progress = train_fashion_vit(max_minutes=args.max_minutes)
        state = "trained" if progress.finished else "stopped (run again to continue)"
        print(f"{state}: {progress.epochs_done}/{progress.epochs} epochs, losses {progress.losses} -> {progress.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

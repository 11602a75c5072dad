"""Side-by-side speed of the Fashion-MNIST ResNet-like CNN and shrunk copies of it, in one process.

Needs the benchmark's trained weights (benchmarks/results/raw/structure_fmnist/dense.pt, written by
``structure_fashion_mnist.py train``). Shrinks half the MACs by L2 with global allocation at round_to 4, 8
and 16 and with uniform allocation, and times them all side by side at batch 1 and 8 (images/s, median
of 10 after 3 warm-ups, 2 threads, the models' passes alternating). Speed does not depend on the
weights' values, so no fine-tuning is done.

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_cnn_widths.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import structure_fashion_mnist as bench  # noqa: E402

from prunekit.structure import prune_structure  # noqa: E402
from prunekit.structure.measure import SpeedProtocol, image_inputs, measure_side_by_side  # noqa: E402

SPEED = SpeedProtocol(batch_sizes=(1, 8), runs=10, warmup=3, threads=2, seq_len=0)


def _shrunk(base: torch.nn.Module, allocation: dict) -> tuple[torch.nn.Module, list]:
    model = copy.deepcopy(base)
    result = prune_structure(model, 0.5, example_inputs=(torch.zeros(1, 1, 28, 28),), importance="l2",
                             target="macs", allocation=allocation)
    return model, list(result.plan.widths.values())


def main() -> None:
    torch.set_num_threads(2)
    base = bench.ResNetLike(widths=(16, 32, 64), blocks=(2, 2, 2))
    base.load_state_dict(torch.load(bench.RAW / "dense.pt", weights_only=True))
    models = {"dense": base.eval()}
    for round_to in (4, 8, 16):
        model, widths = _shrunk(base, {"name": "global", "round_to": round_to, "floor": 0.1})
        models[f"l2 global round_to {round_to} {widths}"] = model.eval()
    model, widths = _shrunk(base, {"name": "uniform", "round_to": 4, "floor": 0.1})
    models[f"l2 uniform round_to 4 {widths}"] = model.eval()
    results = measure_side_by_side(models, image_inputs((1, 28, 28)), 1, SPEED, unit="images")
    dense = results["dense"].throughput
    for label, result in results.items():
        print(label, {batch: f"{value:.0f} img/s ({value / dense[batch]:.2f}×)" for batch, value in result.throughput.items()})


if __name__ == "__main__":
    main()

"""Structural pruning of a ResNet-like CNN on Fashion-MNIST: half the MACs, a short fine-tune, accuracy and
measured CPU speed, prunekit against Torch-Pruning 1.6.1 with the same importance.

The whole benchmark, resumable (a run whose result file exists is skipped; each run is a fresh process,
each under the CPU lock); raw results in benchmarks/results/raw/structure_fmnist/, the report in
benchmarks/results/structure_fashion_mnist.{md,json}:

    pip install --no-deps torch-pruning==1.6.1      # --no-deps keeps the installed torch
    python benchmarks/structure_fashion_mnist.py all --lock /tmp/prunekit-cpu.lock

Runs, in order (``plan`` lists them with their commands):

- ``train``: the dense model, 6 epochs (a step of 128 images costs about 0.4 s of one core, so an
  epoch of 469 steps takes a few minutes on 2 cores and the whole training well under 25 minutes);
- ``shrink``: half the MACs of one image removed, then a fine-tune of 2 epochs on the training set:
  prunekit with Taylor (plain cross-entropy and distillation from the dense model), with L2
  magnitude and with Fisher (one gradient per calibration image); Torch-Pruning with Taylor and with L2 magnitude (global ranking, its channel ratio
  bisected on copies until half the MACs go, as prunekit's allocation does directly);
- ``report``: the table, and the issue's target checked (PASS/MISS): prunekit's best accuracy within
  1 point of the dense model, with the measured CPU speedups.

Protocol: ResNetLike(widths 16/32/64, 2 blocks a stage), SGD + Nesterov, lr 0.05, cosine, batch 128,
seed 0, the full 60 k training set; fine-tune lr 0.01, cosine; accuracy on the full 10 k test set.
Pruning targets 50 % of the MACs of one image, keeps widths multiples of 8 (both tools), calibrates on
the first 1024 training images. Speed: median of 10 timed forward passes after 3 warm-up passes, 2
threads, batches of 1, 8 and 256 images; every shrunk model is timed side by side with the dense one in
its own process, their passes alternating, and its speedup is against that paired dense timing (timings
taken apart, in different processes or states of the machine, differed by more than 2× here). A single run by hand, for example:

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_fashion_mnist.py shrink --tool prunekit --importance taylor
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402

from phases import phase_command, print_plan, run_phases  # noqa: E402
from prunekit.evaluate.accuracy import accuracy  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.models.fashion_mnist import load_fashion_mnist  # noqa: E402
from prunekit.structure import classifier_calibration, prune_structure  # noqa: E402
from prunekit.structure.measure import (SpeedProtocol, count_macs, count_parameters, image_inputs, measure,  # noqa: E402
                                        measure_side_by_side)
from prunekit.training.recovery import recover_classifier  # noqa: E402
from prunekit.structure.zoo import ResNetLike  # noqa: E402
from prunekit.training.loop import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = ROOT / "raw" / "structure_fmnist"
SPEED = SpeedProtocol(batch_sizes=(1, 8, 256), runs=10, warmup=3, threads=2, seq_len=0)
TARGET_MACS = 0.5
CALIBRATION = 1024
EPOCHS = 6
ROUND_TO = 8  # kept widths; 8 measured faster than 4 at batch 1 and 8 (benchmarks/structure_cnn_widths.py)
FINETUNE_EPOCHS = 2
ACCURACY_POINTS = 1.0
RUNS = (("prunekit", "taylor", "plain"), ("prunekit", "taylor", "distill"), ("prunekit", "l2", "plain"),
        ("prunekit", "fisher", "plain"), ("torch-pruning", "taylor", "plain"), ("torch-pruning", "l2", "plain"))


def run_name(tool: str, importance: str, mode: str, finetune_epochs: int) -> str:
    return f"{tool}-{importance}-{mode}-ft{finetune_epochs}"


def plan() -> list[tuple[str, list[str]]]:
    """(result name, phase arguments) of every run, in the order ``all`` runs them."""
    runs = [("dense", ["train", "--epochs", str(EPOCHS)])]
    for tool, importance, mode in RUNS:
        runs.append((run_name(tool, importance, mode, FINETUNE_EPOCHS),
                     ["shrink", "--tool", tool, "--importance", importance, "--mode", mode,
                      "--finetune-epochs", str(FINETUNE_EPOCHS)]))
    return runs


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNetLike(widths=(16, 32, 64), blocks=(2, 2, 2))


def _data():
    return load_fashion_mnist("train"), load_fashion_mnist("test")


def _speed(model) -> dict:
    return measure(model, image_inputs((1, 28, 28)), 1, SPEED, unit="images").to_dict()


def _speeds_side_by_side(dense, shrunk) -> tuple[dict, dict]:
    speeds = measure_side_by_side({"dense": dense, "shrunk": shrunk}, image_inputs((1, 28, 28)), 1, SPEED, unit="images")
    return speeds["dense"].to_dict(), speeds["shrunk"].to_dict()


def train(epochs: int) -> None:
    torch.set_num_threads(2)
    train_set, test_set = _data()
    model = _model()
    started = time.perf_counter()
    history = train_classifier(model, train_set.images, train_set.labels, epochs=epochs, lr=0.05, seed=0,
                               description="Training the dense ResNet-like")
    seconds = time.perf_counter() - started
    RAW.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), RAW / "dense.pt")
    result = {"epochs": epochs, "train_seconds": seconds, "losses": history.losses,
              "accuracy": accuracy(model, test_set.images, test_set.labels),
              "parameters": count_parameters(model), "macs": count_macs(model, (test_set.images[:1],)),
              "speed": _speed(model), "environment": environment()}
    write_json(RAW / "dense.json", result)  # written last: its presence marks the phase done
    print(json.dumps({k: v for k, v in result.items() if k not in ("speed", "environment", "losses")}, indent=1))


def _dense():
    if not (RAW / "dense.pt").exists():
        raise SystemExit(f"no dense model in {RAW}; run the train phase first")
    model = _model()
    model.load_state_dict(torch.load(RAW / "dense.pt", weights_only=True))
    return model.eval()


def _prunekit(model, importance: str, calibration_images, calibration_labels) -> dict:
    result = prune_structure(model, TARGET_MACS, example_inputs=(calibration_images[:1],), importance=importance,
                             target="macs", allocation={"name": "global", "round_to": ROUND_TO, "floor": 0.1},
                             calibration=classifier_calibration(calibration_images, calibration_labels, 128))
    return {"plan": result.plan.to_dict(), "notes": result.notes}


def _torch_pruning(model, importance: str, calibration_images, calibration_labels) -> dict:
    """Torch-Pruning's MetaPruner with global ranking; its channel ratio is bisected on copies so that
    half of the MACs go, as prunekit's allocation does directly."""
    import torch_pruning as tp

    criteria = {"l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                "taylor": lambda: tp.importance.GroupTaylorImportance(),
                "hessian": lambda: tp.importance.GroupHessianImportance()}
    if importance not in criteria:
        raise SystemExit(f"the Torch-Pruning runs support {sorted(criteria)}, not {importance}")

    def prune(target, ratio: float) -> None:
        criterion = criteria[importance]()
        pruner = tp.pruner.MetaPruner(target, calibration_images[:1], importance=criterion, global_pruning=True,
                                      pruning_ratio=ratio, ignored_layers=[target.fc], round_to=ROUND_TO)
        target.zero_grad()
        if importance in ("taylor", "hessian"):
            for start in range(0, calibration_images.shape[0], 128):
                x, y = calibration_images[start:start + 128], calibration_labels[start:start + 128]
                if importance == "hessian":  # its estimate needs one gradient per sample
                    for i in range(x.shape[0]):
                        target.zero_grad(set_to_none=False)  # it writes its estimate into .grad, which must exist
                        torch.nn.functional.cross_entropy(target(x[i:i + 1]), y[i:i + 1]).backward()
                        criterion.accumulate_grad(target)
                else:
                    torch.nn.functional.cross_entropy(target(x), y).backward()
        pruner.step()
        target.zero_grad()

    base = count_macs(model, (calibration_images[:1],))
    low, high = 0.0, 0.9
    for _ in range(10):
        middle = (low + high) / 2
        trial = copy.deepcopy(model)
        prune(trial, middle)
        if count_macs(trial, (calibration_images[:1],)) <= (1 - TARGET_MACS) * base:
            high = middle
        else:
            low = middle
    prune(model, high)
    return {"pruning_ratio": high, "macs_fraction": count_macs(model, (calibration_images[:1],)) / base}


def shrink(tool: str, importance: str, finetune_epochs: int, mode: str) -> None:
    torch.set_num_threads(2)
    train_set, test_set = _data()
    dense = _dense()
    model = copy.deepcopy(dense)
    images, labels = train_set.images[:CALIBRATION], train_set.labels[:CALIBRATION]
    started = time.perf_counter()
    details = (_prunekit if tool == "prunekit" else _torch_pruning)(model, importance, images, labels)
    prune_seconds = time.perf_counter() - started
    accuracy_pruned = accuracy(model, test_set.images, test_set.labels)
    started = time.perf_counter()
    recovery = recover_classifier(model, train_set.images, train_set.labels, teacher=dense if mode == "distill" else None,
                                  objective=mode, epochs=finetune_epochs, lr=0.01, seed=0)
    dense_speed, shrunk_speed = _speeds_side_by_side(dense, model)
    result = {"tool": tool, "importance": importance, "finetune_epochs": finetune_epochs, "mode": mode,
              "prune_seconds": prune_seconds, "finetune_seconds": time.perf_counter() - started,
              "accuracy_pruned": accuracy_pruned, "accuracy": accuracy(model, test_set.images, test_set.labels),
              "parameters": count_parameters(model), "macs": count_macs(model, (test_set.images[:1],)),
              "round_to": ROUND_TO, "speed": shrunk_speed, "speed_dense_side_by_side": dense_speed,
              "details": details, "recovery_losses": recovery.losses,
              "environment": environment()}
    RAW.mkdir(parents=True, exist_ok=True)
    write_json(RAW / f"{run_name(tool, importance, mode, finetune_epochs)}.json", result)
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("speed", "speed_dense_side_by_side", "environment", "details", "recovery_losses")},
                     indent=1))


def _paired(run: dict) -> dict:
    """The dense throughput timed beside this run (older raw files have none: the training-time figure)."""
    return run.get("speed_dense_side_by_side", {}).get("throughput") or {}


def report() -> None:
    dense = json.loads((RAW / "dense.json").read_text())
    rows, runs = [], []
    names = [name for name, _ in plan() if name != "dense"]
    for name in names:
        path = RAW / f"{name}.json"
        if path.exists():
            runs.append({**json.loads(path.read_text()), "name": name})
    batches = ("1", "8", "256")
    paired = [_paired(run) for run in runs if _paired(run)]
    # The dense row shows the median of its side-by-side timings (one per run), else its training-time one.
    base_speed = ({b: statistics.median(p[b] for p in paired) for b in batches} if paired
                  else dense["speed"]["throughput"])
    rows.append(("dense", "–", f"{dense['parameters']:,}", f"{dense['macs']:,}", "1.000", "–",
                 f"{dense['accuracy']:.2%}", "–", *(f"{base_speed[b]:.0f}" for b in batches),
                 "1.00×", "1.00×", "1.00×", "–"))
    for run in runs:
        speed = run["speed"]["throughput"]
        reference = _paired(run) or dense["speed"]["throughput"]
        rows.append((run["tool"], f"{run['importance']} ({run['mode']}, {run['finetune_epochs']} ep)",
                     f"{run['parameters']:,}", f"{run['macs']:,}", f"{run['macs'] / dense['macs']:.3f}",
                     f"{run['accuracy_pruned']:.2%}", f"{run['accuracy']:.2%}",
                     f"{(run['accuracy'] - dense['accuracy']) * 100:+.2f}",
                     *(f"{speed[b]:.0f}" for b in batches),
                     *(f"{speed[b] / reference[b]:.2f}×" + ("" if _paired(run) else " (unpaired)") for b in batches),
                     f"{run['prune_seconds']:.1f}"))
    headers = ["model", "importance (recovery)", "parameters", "MACs / image", "MACs vs dense", "accuracy pruned",
               "accuracy after fine-tune", "Δ points", "img/s b1", "img/s b8", "img/s b256", "speedup b1",
               "speedup b8", "speedup b256", "prune s"]
    checks = []
    ours = [run for run in runs if run["tool"] == "prunekit"]
    if ours:
        best = max(ours, key=lambda run: run["accuracy"])
        drop = (dense["accuracy"] - best["accuracy"]) * 100
        speed = best["speed"]["throughput"]
        reference = _paired(best) or dense["speed"]["throughput"]
        speedups = ", ".join(f"{speed[b] / reference[b]:.2f}× at batch {b}" for b in batches)
        checks.append((f"half the MACs, accuracy within {ACCURACY_POINTS:g} point of dense",
                       "PASS" if drop <= ACCURACY_POINTS else "MISS",
                       f"{best['name']}: {best['accuracy']:.2%} vs {dense['accuracy']:.2%} ({-drop:+.2f} points), "
                       f"MACs {best['macs'] / dense['macs']:.3f} of dense; measured speedup {speedups}"
                       + ("" if _paired(best) else " (dense timed apart)")))
    else:
        checks.append((f"half the MACs, accuracy within {ACCURACY_POINTS:g} point of dense", "NOT RUN", "–"))
    missing = [name for name in names if not (RAW / f"{name}.json").exists()]
    text = (f"# Fashion-MNIST, ResNet-like, half the MACs\n\nDense: {dense['epochs']} epochs, "
            f"{dense['accuracy']:.2%} test accuracy, trained in {dense['train_seconds']:.0f} s.\n\n"
            f"{markdown_table(headers, rows)}\n\n## Target\n\n{markdown_table(['target', 'result', 'measured'], checks)}"
            f"\n\nSpeed: {SPEED.describe()}; each shrunk model timed side by side with the dense one, their "
            f"passes alternating; its speedups are against that dense timing, and the dense row shows the median "
            f"of those timings.\n" + (f"\nNot run yet: {', '.join(missing)}.\n" if missing else ""))
    write_json(ROOT / "structure_fashion_mnist.json", {"dense": dense, "runs": runs, "checks": checks,
                                                       "speed_protocol": SPEED.describe()})
    (ROOT / "structure_fashion_mnist.md").write_text(text)
    print(text)
    for target, verdict, figures in checks:
        print(f"{verdict:8} {target}: {figures}")


def _command(arguments: list[str], lock: str | None) -> list[str]:
    return phase_command(__file__, arguments, lock)


def run_all(lock: str | None) -> None:
    """Every run in order, each in a fresh process, skipping those whose result file exists; then the report."""
    run_phases(__file__, plan(), RAW, lock, report, needs_torch_pruning=any(tool == "torch-pruning" for tool, _, _ in RUNS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    train_parser = sub.add_parser("train", help="train the dense model")
    train_parser.add_argument("--epochs", type=int, default=EPOCHS)
    shrink_parser = sub.add_parser("shrink", help="one pruning run with its fine-tune")
    shrink_parser.add_argument("--tool", choices=["prunekit", "torch-pruning"], default="prunekit")
    shrink_parser.add_argument("--importance", default="taylor")
    shrink_parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    shrink_parser.add_argument("--mode", choices=["plain", "distill"], default="plain")
    sub.add_parser("report", help="the table and the target, from the result files")
    sub.add_parser("plan", help="list every run of 'all' with its command and whether its result exists")
    all_parser = sub.add_parser("all", help="every run in order (resumable), then the report")
    all_parser.add_argument("--lock", help="run each phase under 'flock LOCK' (e.g. /tmp/prunekit-cpu.lock)")
    args = parser.parse_args(argv)
    if args.phase == "train":
        train(args.epochs)
    elif args.phase == "shrink":
        shrink(args.tool, args.importance, args.finetune_epochs, args.mode)
    elif args.phase == "plan":
        print_plan(__file__, plan(), RAW)
    elif args.phase == "all":
        run_all(args.lock)
    else:
        report()


if __name__ == "__main__":
    main(sys.argv[1:])

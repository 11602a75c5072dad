"""Data pruning on Fashion-MNIST: test accuracy of a fixed CNN trained on pruned subsets.

Grid: 8 rows (full data, random, EL2N, GraNd, forgetting, AUM, prototypes, CCS) x kept fractions
90/70/50/30/10 % x 3 training seeds. The scores are computed once by a short proxy training
(SmallCNN width 8, 5 epochs, 3 seeds; EL2N/GraNd read after epoch 1) and each subset is trained
with the same *step budget* as the full-data run (one epoch of 60 k examples = 469 steps of 128,
drawn as consecutive shuffles of the subset), so a smaller subset is seen more often: the
comparison is about which data, not how much compute.

Phases (run by hand; raw per-run results go to benchmarks/results/raw/data_fmnist/, resumable):

    flock /tmp/prunekit-cpu.lock python benchmarks/data_fashion_mnist.py score --score el2n grand forgetting aum prototypes  # timed
    flock /tmp/prunekit-cpu.lock python benchmarks/data_fashion_mnist.py fullrun              # one full training, timed
    flock /tmp/prunekit-cpu.lock python benchmarks/data_fashion_mnist.py cost                 # EL2N alone, forgetting+AUM alone
    nice -n 19 python benchmarks/data_fashion_mnist.py train [--max-minutes 60] [--threads 1]  # the accuracy grid
    python benchmarks/data_fashion_mnist.py report                                            # JSON, Markdown, plot
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prunekit.data import ProxyConfig, ScoreTable, score_data, select  # noqa: E402
from prunekit.evaluate.accuracy import accuracy  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.evaluate.resources import Measured  # noqa: E402
from prunekit.models.fashion_mnist import load_fashion_mnist  # noqa: E402
from prunekit.models.vision import SmallCNN  # noqa: E402
from prunekit.training.loop import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = ROOT / "raw" / "data_fmnist"
FRACTIONS = (0.9, 0.7, 0.5, 0.3, 0.1)
SEEDS = (0, 1, 2)
WIDTH = 8  # the trained CNN and the proxy: SmallCNN(width=8), ~105 k parameters
BUDGET_EPOCHS = 1  # step budget of every training run: 1 epoch of the full 60 k set (469 steps of 128)
BATCH = 128
LR = 0.05
PROXY = ProxyConfig(model="cnn", cnn_width=WIDTH, epochs=5, seeds=3, batch_size=BATCH, lr=LR)
CCS_SCORE, CCS_CUT = "aum", 0.1
# row name -> (score, strategy, strategy settings)
ROWS = {
    "random": ("random", "random", {}),
    "el2n": ("el2n", "hardest", {}),
    "grand": ("grand", "hardest", {}),
    "forgetting": ("forgetting", "hardest", {}),
    "aum": ("aum", "hardest", {}),
    "prototypes": ("prototypes", "hardest", {}),
    "ccs": (CCS_SCORE, "ccs", {"hard_cut": CCS_CUT, "strata": 50}),
}
SCORE_SETTINGS = {"el2n": {"epoch": 1}, "grand": {"epoch": 1}, "prototypes": {"embedding": "proxy"}}


def _scores_dir(name: str) -> Path:
    return RAW / f"scores_{name}"


def phase_score(names: list[str]) -> None:
    """Compute scores on the full training set in one scoring pass (timed; run holding the CPU lock).

    Scores named together share one proxy training, as they would for a user; the table is written to
    each score's folder with the names it was computed with, so the cost report can say so.
    """
    torch.set_num_threads(2)
    train = load_fashion_mnist("train")
    with Measured() as measured:
        table = score_data((train.images, train.labels), [(name, SCORE_SETTINGS.get(name, {})) for name in names],
                           proxy=PROXY, seed=0)
    table.meta["measured"] = {"seconds": measured.seconds, "peak_rss_bytes": measured.peak_rss,
                              "load_average_1min_at_end": os.getloadavg()[0], "computed_with": list(names)}
    for name in names:
        folder = _scores_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        table.write(folder)
    print(f"{', '.join(names)}: {measured.seconds:.1f} s, timings {table.meta['timings']}")


COST_GROUPS = (("el2n",), ("forgetting", "aum"))  # what one score (or one pair) costs without the others


def phase_cost() -> None:
    """Time scores computed without the rest (results not kept: the grid reads the shared pass's tables)."""
    torch.set_num_threads(2)
    train = load_fashion_mnist("train")
    costs = {}
    for names in COST_GROUPS:
        with Measured() as measured:
            table = score_data((train.images, train.labels), [(n, SCORE_SETTINGS.get(n, {})) for n in names],
                               proxy=PROXY, seed=0)
        costs["+".join(names)] = {"seconds": measured.seconds, "timings": table.meta["timings"],
                                  "epochs_trained": table.meta["proxy"]["epochs_trained"]}
        print(f"{'+'.join(names)}: {measured.seconds:.1f} s", flush=True)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "score_costs_alone.json").write_text(json.dumps(costs, indent=1))


class StepBudget(torch.utils.data.Sampler):
    """``length`` indices made of consecutive seeded shuffles of ``size`` rows: a fixed number of steps for any subset."""

    def __init__(self, size: int, length: int, seed: int):
        self.size, self.length, self.seed = size, length, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        rounds = -(-self.length // self.size)
        return iter(torch.cat([torch.randperm(self.size, generator=generator) for _ in range(rounds)])[:self.length].tolist())

    def __len__(self) -> int:
        return self.length


def _train(images: torch.Tensor, labels: torch.Tensor, seed: int, examples: int) -> torch.nn.Module:
    """One cosine schedule over ``examples`` presentations (``examples / BATCH`` steps), whatever the subset size."""
    torch.manual_seed(seed)
    model = SmallCNN(10, width=WIDTH)
    train_classifier(model, images, labels, epochs=1, batch_size=BATCH, lr=LR, seed=seed,
                     sampler=StepBudget(len(labels), examples, seed))
    return model


def phase_fullrun() -> None:
    """One full-data training run, timed (the unit the scoring cost is expressed in)."""
    torch.set_num_threads(2)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    with Measured() as measured:
        model = _train(train.images, train.labels, 0, BUDGET_EPOCHS * len(train))
    result = {"seconds": measured.seconds, "test_accuracy": accuracy(model, test.images, test.labels),
              "steps": BUDGET_EPOCHS * ((len(train) + BATCH - 1) // BATCH), "threads": torch.get_num_threads(),
              "load_average_1min_at_end": os.getloadavg()[0]}
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "fullrun.json").write_text(json.dumps(result, indent=2))
    print(result)


def _run_file(row: str, fraction: float, seed: int) -> Path:
    return RAW / "runs" / f"{row}_{int(round(fraction * 100))}_{seed}.json"


def _claim(path: Path) -> bool:
    """Let several train phases share the grid: a run is taken by the first to create its claim file."""
    try:
        os.close(os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def phase_train(max_minutes: float, threads: int) -> None:
    torch.set_num_threads(threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    total = len(train)
    tables = {}
    for row, (score, _, _) in ROWS.items():
        if score != "random" and not (_scores_dir(score) / "scores.csv").exists():
            print(f"skipping {row}: run `score --score {score}` first")
            continue
        tables[row] = None if score == "random" else ScoreTable.read(_scores_dir(score))
    # Seed-major order: a grid cut short by the time limit still covers every cell once before any twice.
    jobs = [job for seed in SEEDS for job in [("full", 1.0, seed)]
            + [(row, fraction, seed) for fraction in FRACTIONS for row in ROWS if row in tables]]
    started = time.time()
    (RAW / "runs").mkdir(parents=True, exist_ok=True)
    for row, fraction, seed in jobs:
        path = _run_file(row, fraction, seed)
        if path.exists():
            continue
        if (time.time() - started) / 60 > max_minutes:
            print("time limit reached; run again to continue")
            return
        if not _claim(path):
            continue
        if row == "full":
            indices = np.arange(total)
            meta: dict = {}
        else:
            score, strategy, settings = ROWS[row]
            table = tables[row]
            if table is None:  # the random baseline: a uniform subset drawn with the run's seed
                selection = select(np.zeros(total), keep=fraction, strategy="random", seed=seed)
            else:
                selection = select(table, score, keep=fraction, strategy=strategy, seed=seed, **settings)
            indices = selection.indices
            meta = {"strategy": selection.meta["strategy"], "notes": selection.meta.get("strategy_notes")}
        index = torch.from_numpy(indices)
        t0 = time.time()
        model = _train(train.images[index], train.labels[index], seed, BUDGET_EPOCHS * total)
        result = {"row": row, "fraction": fraction, "seed": seed, "kept": int(len(indices)),
                  "passes_over_subset": BUDGET_EPOCHS * total / len(indices),
                  "steps": -(-BUDGET_EPOCHS * total // BATCH), "train_seconds": time.time() - t0,
                  "test_accuracy": accuracy(model, test.images, test.labels), **meta}
        path.write_text(json.dumps(result, indent=2))
        path.with_suffix(".claim").unlink()
        print(f"{row:>10} {fraction:.0%} seed {seed}: {result['test_accuracy']:.4f} ({result['train_seconds']:.0f} s)",
              flush=True)


def phase_report() -> None:
    from prunekit.evaluate.plots import plot_curves

    runs = [json.loads(p.read_text()) for p in sorted((RAW / "runs").glob("*.json"))]
    if not runs:
        sys.exit("no runs yet")
    full = [r["test_accuracy"] for r in runs if r["row"] == "full"]
    table: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r["row"] != "full":
            table.setdefault(r["row"], {}).setdefault(r["fraction"], []).append(r["test_accuracy"])

    def cell(values: list[float]) -> str:
        if not values:
            return "–"
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}" + ("" if len(values) == len(SEEDS) else f" (n={len(values)})")

    headers = ["method", *[f"{int(f * 100)} %" for f in FRACTIONS]]
    rows = [["full data (100 %)", *[cell(full)] * len(FRACTIONS)]]
    for row in ROWS:
        if row in table:
            rows.append([row, *[cell(table[row].get(f, [])) for f in FRACTIONS]])
    full_mean = float(np.mean(full)) if full else None
    deltas = [["method", *[f"{int(f * 100)} %" for f in FRACTIONS]]]
    for row in ROWS:
        if row in table and full_mean is not None:
            deltas.append([row, *[f"{100 * (np.mean(table[row][f]) - full_mean):+.2f}" if table[row].get(f) else "–"
                                  for f in FRACTIONS]])
    costs = []
    fullrun = json.loads((RAW / "fullrun.json").read_text()) if (RAW / "fullrun.json").exists() else None
    for name in sorted({score for score, _, _ in ROWS.values()} - {"random"}):
        folder = _scores_dir(name)
        if (folder / "scores.json").exists():
            meta = json.loads((folder / "scores.json").read_text())
            seconds = meta["measured"]["seconds"]
            together = [other for other in meta["measured"].get("computed_with", [name]) if other != name]
            costs.append([name, f"{meta['proxy']['epochs_trained']} × {len(meta['proxy']['seeds_run'])}",
                          f"{seconds:.0f}", f"{seconds / fullrun['seconds']:.2f}" if fullrun else "–",
                          ", ".join(together) or "alone",
                          ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in meta["timings"].items())])
    result = {"protocol": _protocol(), "full_data": full, "runs": runs, "scoring_cost": costs, "full_run": fullrun,
              "environment": environment()}
    ROOT.mkdir(parents=True, exist_ok=True)
    write_json(ROOT / "data_fashion_mnist.json", result)
    markdown = ["# Data pruning on Fashion-MNIST", "", _protocol_text(), "",
                "Test accuracy (%), mean ± std over training seeds:", "", markdown_table(headers, rows), "",
                "Difference to full data (points):", "", markdown_table(deltas[0], deltas[1:]), ""]
    if costs:
        markdown += ["Scoring cost (60 k examples, 2 threads, CPU lock held; scores computed together share one "
                     "proxy training, whose time is counted once for the pass):", "",
                     markdown_table(["score", "proxy epochs × seeds", "pass seconds", "× one full training run",
                                     "computed with", "breakdown"], costs), ""]
    alone_path = RAW / "score_costs_alone.json"
    if alone_path.exists() and fullrun:
        alone = json.loads(alone_path.read_text())
        markdown += ["The same scores computed without the others (`cost` phase):", "",
                     markdown_table(["scores", "proxy epochs trained × seeds", "seconds", "× one full training run"],
                                    [[name, f"{info['epochs_trained']} × {PROXY.seeds}", f"{info['seconds']:.0f}",
                                      f"{info['seconds'] / fullrun['seconds']:.2f}"] for name, info in alone.items()]), ""]
    if fullrun:
        markdown += [f"One full training run (the unit above): {fullrun['seconds']:.0f} s, {fullrun['steps']} steps, "
                     f"test accuracy {100 * fullrun['test_accuracy']:.2f} %.", ""]
    (ROOT / "data_fashion_mnist.md").write_text("\n".join(markdown))
    curves = {row: ([100 * f for f in FRACTIONS if table[row].get(f)],
                    [100 * float(np.mean(table[row][f])) for f in FRACTIONS if table[row].get(f)]) for row in table}
    plot_curves(curves, ROOT / "data_fashion_mnist.png", "kept fraction of the training set (%)", "test accuracy (%)",
                "Fashion-MNIST, SmallCNN width 8, equal step budget",
                reference=("full data", 100 * full_mean) if full_mean is not None else None)
    print("\n".join(markdown))


def _protocol() -> dict:
    return {"dataset": "Fashion-MNIST, 60 k train / 10 k test", "model": f"SmallCNN(width={WIDTH})",
            "budget": f"{BUDGET_EPOCHS} epoch(s) of the full set in steps ({BUDGET_EPOCHS * 469} steps of {BATCH}); "
                      "a subset of fraction f is shuffled and repeated to fill them (about 1/f passes)",
            "optimizer": f"SGD momentum 0.9 Nesterov, lr {LR}, weight decay 5e-4, cosine", "seeds": list(SEEDS),
            "fractions": list(FRACTIONS), "proxy": PROXY.describe(), "score_settings": SCORE_SETTINGS,
            "rows": {k: {"score": v[0], "strategy": v[1], **v[2]} for k, v in ROWS.items()}}


def _protocol_text() -> str:
    return (f"Protocol: SmallCNN(width={WIDTH}) trained with SGD (lr {LR}, Nesterov momentum 0.9, weight decay 5e-4, "
            f"cosine) for the step budget of {BUDGET_EPOCHS} full epoch(s) ({BUDGET_EPOCHS * 469} steps of {BATCH}); "
            "a subset keeping fraction f is shuffled and repeated to fill them (about 1/f passes), so every run "
            "takes the same number of steps. "
            "Test accuracy on the 10 k test set, 3 training seeds (0, 1, 2: initialisation and shuffle; random and "
            "CCS also draw their subset with it). Scores come from one scoring pass: proxy SmallCNN(width=8), "
            "5 epochs, 3 proxy seeds averaged, EL2N and GraNd read after epoch 1, forgetting and AUM over the 5 "
            "epochs, prototypes = cosine distance to the nearest of 10 k-means centroids of the proxy's penultimate "
            f"features. EL2N, GraNd, forgetting, AUM and prototypes keep the hardest examples; CCS stratifies on "
            f"{CCS_SCORE.upper()} after cutting the hardest {CCS_CUT:.0%} (50 strata); random draws a uniform subset. "
            "No class balancing.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    score = sub.add_parser("score")
    score.add_argument("--score", required=True, nargs="+", choices=sorted({s for s, _, _ in ROWS.values()} - {"random"}),
                       help="one or more scores; several share one proxy training")
    sub.add_parser("fullrun")
    sub.add_parser("cost")
    train = sub.add_parser("train")
    train.add_argument("--max-minutes", type=float, default=600.0)
    train.add_argument("--threads", type=int, default=2, help="torch threads (run two 1-thread phases side by side to share the grid)")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.phase == "score":
        phase_score(args.score)
    elif args.phase == "fullrun":
        phase_fullrun()
    elif args.phase == "cost":
        phase_cost()
    elif args.phase == "train":
        phase_train(args.max_minutes, args.threads)
    else:
        phase_report()


if __name__ == "__main__":
    main()

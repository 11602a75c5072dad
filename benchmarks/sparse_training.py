"""Sparse-training benchmark: Fashion-MNIST (a small CNN and an MLP) and SmolLM2 recovery fine-tuning.

Vision grid: every method × sparsity × seed, the same optimizer, schedule and epoch budget for all
(see ``BUDGET``); results are appended run by run to a JSON file, so an interrupted grid resumes
where it stopped. Accuracy-only runs need no lock (run them under ``nice -n 19``)::

    nice -n 19 python benchmarks/sparse_training.py vision --model mlp
    nice -n 19 python benchmarks/sparse_training.py vision --model cnn
    python benchmarks/sparse_training.py report          # tables + plots from what has been measured
    flock /tmp/prunekit-cpu.lock python benchmarks/sparse_training.py prepare   # Wanda 50 %, once
    flock /tmp/prunekit-cpu.lock python benchmarks/sparse_training.py recovery --mode full
    flock /tmp/prunekit-cpu.lock python benchmarks/sparse_training.py recovery --mode lora
    python benchmarks/sparse_training.py smoke --out /tmp/smoke   # seconds; what CI runs

Writes benchmarks/results/sparse_training_{mlp,cnn}.json, sparse_training.{json,md},
sparse_training_{mlp,cnn}.png and sparse_training_recovery_{full,lora}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402

from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.models.fashion_mnist import ImageSet, load_fashion_mnist  # noqa: E402
from prunekit.training import FixedMask, LotteryTicket  # noqa: E402
from prunekit.training.fit import train_sparse  # noqa: E402
from prunekit.training.report import plot_accuracy_vs_sparsity  # noqa: E402
from prunekit.training.vision_job import VisionTrainingRecipe, build_for_run, build_model, run_vision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The budget: the same for every method. ``epochs`` is per training run (per round for the
# lottery ticket); the one-shot baseline fine-tunes for ``finetune_epochs`` after ``epochs`` dense.
BUDGET = {
    "mlp": {"epochs": 4, "finetune_epochs": 2, "train_limit": 30000, "model_settings": {"hidden": [300, 100]}},
    "cnn": {"epochs": 3, "finetune_epochs": 2, "train_limit": 10000, "model_settings": {"width": 8}},
}
SPARSITIES = [0.8, 0.9, 0.95, 0.98]
SEEDS = [0, 1, 2]
# method label -> (prunekit method, distribution); the paper's distribution for each method
METHODS = {
    "one-shot magnitude + fine-tune": ("magnitude", "global"),
    "GMP": ("gmp", "uniform"),
    "GMP (ERK)": ("gmp", "erk"),
    "lottery ticket (rewound)": ("lottery", "global"),
    "lottery mask, random re-init": ("lottery-reinit", "global"),
    "SNIP": ("snip", "global"),
    "GraSP": ("grasp", "global"),
    "SynFlow": ("synflow", "global"),
    "random (uniform)": ("random", "uniform"),
    "random (ERK)": ("random", "erk"),
    "SET": ("set", "erk"),
    "RigL": ("rigl", "erk"),
}


def recipe_for(model: str, method: str, sparsity: float, seed: int, distribution: str | None,
               budget: dict[str, Any]) -> VisionTrainingRecipe:
    return VisionTrainingRecipe(method=method, model=model, sparsity=sparsity, seed=seed, distribution=distribution,
                                epochs=budget["epochs"], finetune_epochs=budget["finetune_epochs"],
                                train_limit=budget["train_limit"], test_limit=budget.get("test_limit"),
                                **budget["model_settings"])


def _record(label: str, model: str, seed: int, sparsity: float, accuracy: float, seconds: float, achieved: float,
            flops_ratio: float | None) -> dict:
    return {"label": label, "model": model, "seed": seed, "sparsity": sparsity, "accuracy": accuracy,
            "seconds": seconds, "achieved": achieved, "flops_ratio": flops_ratio}


def run_grid(model: str, budget: dict[str, Any], seeds: list[int], sparsities: list[float], labels: list[str],
             path: Path, data: tuple[ImageSet, ImageSet]) -> list[dict]:
    done: list[dict] = json.loads(path.read_text())["runs"] if path.exists() else []
    have = {(r["label"], r["seed"], r["sparsity"]) for r in done}

    def save(record: dict) -> None:
        done.append(record)
        have.add((record["label"], record["seed"], record["sparsity"]))
        write_json(path, {"model": model, "budget": budget, "environment": environment(), "runs": done})
        print(json.dumps(record), flush=True)

    for seed in seeds:
        dense_state = None
        magnitude_missing = "one-shot magnitude + fine-tune" in labels and any(
            ("one-shot magnitude + fine-tune", seed, s) not in have for s in sparsities)
        if ("dense", seed, 0.0) not in have or magnitude_missing:
            started = time.perf_counter()
            outcome = run_vision(recipe_for(model, "dense", 0.0, seed, None, budget), data, evaluate_every_epoch=False)
            dense_state = {k: v.clone() for k, v in outcome.model.state_dict().items()}
            if ("dense", seed, 0.0) not in have:
                save(_record("dense", model, seed, 0.0, outcome.accuracy, time.perf_counter() - started, 0.0, 1.0))
        for label in labels:
            method, distribution = METHODS[label]
            if method == "lottery":
                if all((label, seed, s) in have for s in sparsities):
                    continue
                for record in run_lottery(model, budget, seed, sparsities, data, "lottery-reinit" in
                                          {METHODS[x][0] for x in labels}):
                    if (record["label"], seed, record["sparsity"]) not in have:
                        save(record)
                continue
            if method == "lottery-reinit":
                continue  # produced with the lottery run, which owns the masks
            for sparsity in sparsities:
                if (label, seed, sparsity) in have:
                    continue
                started = time.perf_counter()
                recipe = recipe_for(model, method, sparsity, seed, distribution, budget)
                outcome = run_vision(recipe, data, dense_state=dense_state if method == "magnitude" else None,
                                     evaluate_every_epoch=False)
                save(_record(label, model, seed, sparsity, outcome.accuracy, time.perf_counter() - started,
                             outcome.sparsifier.sparsity, outcome.flops["ratio"]))
    return done


def run_lottery(model: str, budget: dict[str, Any], seed: int, sparsities: list[float],
                data: tuple[ImageSet, ImageSet], with_reinit: bool) -> list[dict]:
    """One iterative run through every sparsity (rewinding each round), then, for each round's mask,
    the same mask trained from a fresh random initialisation (Frankle & Carbin's control)."""
    train, test = data
    recipe = recipe_for(model, "lottery", sparsities[-1], seed, "global", budget)
    net = build_model(recipe)
    ticket = build_for_run(recipe.model_copy(update={"method_args": {"schedule": sparsities}}), net, train)
    assert isinstance(ticket, LotteryTicket)
    masks: dict[float, dict[str, torch.Tensor]] = {}

    def keep_masks(_info) -> None:
        if ticket.rewound:
            masks[round(ticket.round_targets[ticket.round - 1], 6)] = ticket.masks()

    started = time.perf_counter()
    run = train_sparse(net, ticket, train.images, train.labels, recipe.epochs, batch_size=recipe.batch_size,
                       lr=recipe.lr, seed=seed, test=(test.images, test.labels), on_step=keep_masks,
                       description="Lottery ticket")
    seconds = (time.perf_counter() - started) / (len(sparsities) + 1)
    records = []
    for entry in run.rounds[1:]:
        target = min(sparsities, key=lambda s: abs(s - entry["sparsity"]))
        records.append(_record("lottery ticket (rewound)", model, seed, target, entry["test_accuracy"], seconds,
                               entry["sparsity"], None))
    if with_reinit:
        for target, mask in masks.items():
            started = time.perf_counter()
            fresh = build_model(recipe.model_copy(update={"seed": seed + 1000}))
            fixed = FixedMask(fresh, mask)
            result = train_sparse(fresh, fixed, train.images, train.labels, recipe.epochs,
                                  batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                                  test=(test.images, test.labels), description="Random re-init")
            records.append(_record("lottery mask, random re-init", model, seed, target, result.final_accuracy,
                                   time.perf_counter() - started, fixed.sparsity, None))
    return records


def summarise(runs: list[dict]) -> dict[str, dict[float, tuple[float, float, int]]]:
    table: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        table.setdefault(run["label"], {}).setdefault(run["sparsity"], []).append(100 * run["accuracy"])
    return {label: {s: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for s, v in sorted(cells.items())} for label, cells in table.items()}


def vision_markdown(model: str, payload: dict) -> tuple[str, dict]:
    runs = payload["runs"]
    summary = summarise(runs)
    sparsities = sorted({r["sparsity"] for r in runs if r["label"] != "dense"})
    dense = summary.get("dense", {}).get(0.0)
    rows = []
    for label in METHODS:
        if label not in summary:
            continue
        cells = summary[label]
        rows.append([label] + [f"{cells[s][0]:.2f} ± {cells[s][1]:.2f}" + (f" (n={cells[s][2]})" if cells[s][2] != 3 else "")
                               if s in cells else "–" for s in sparsities])
    seconds = sum(r["seconds"] for r in runs)
    budget = payload["budget"]
    text = "\n".join([
        f"### {model.upper()}: test accuracy (%) on Fashion-MNIST, mean ± std over seeds",
        "",
        (f"Dense: {dense[0]:.2f} ± {dense[1]:.2f} (n={dense[2]})." if dense else "Dense: not measured."),
        "",
        markdown_table(["method"] + [f"{s:.0%}" for s in sparsities], rows),
        "",
        f"Budget: {budget['epochs']} epochs per run (per round for the lottery ticket; one-shot: {budget['epochs']} "
        f"dense + {budget['finetune_epochs']} fine-tuning), training images: "
        f"{budget['train_limit'] or 60000}, test images: {budget.get('test_limit') or 10000}, model settings {budget['model_settings']}; "
        f"{len(runs)} runs, {seconds / 3600:.2f} h of training wall time in total.",
        "",
    ])
    series = {label: ([100 * s for s in cells], [cells[s][0] for s in cells], [cells[s][1] for s in cells])
              for label, cells in summary.items() if label != "dense"}
    return text, {"summary": {k: {str(s): v for s, v in c.items()} for k, c in summary.items()}, "series": series,
                  "dense": dense}


def report(models: list[str]) -> None:
    sections, data = [], {}
    for model in models:
        path = RESULTS / f"sparse_training_{model}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        text, info = vision_markdown(model, payload)
        sections.append(text)
        data[model] = info
        plot_accuracy_vs_sparsity(info["series"], RESULTS / f"sparse_training_{model}.png",
                                  f"Fashion-MNIST {model.upper()}: accuracy vs sparsity (mean ± std, 3 seeds)",
                                  dense=(info["dense"][0], info["dense"][1]) if info["dense"] else None)
    for mode in ("full", "lora"):
        path = RESULTS / f"sparse_training_recovery_{mode}.json"
        if path.exists():
            data[f"recovery_{mode}"] = json.loads(path.read_text())
    recovery_rows = []
    for mode in ("full", "lora"):
        entry = data.get(f"recovery_{mode}")
        if entry:
            ppl, rec = entry["perplexity"], entry["recovery"]
            recovery_rows.append([mode, ppl["dense"], ppl["pruned"], ppl["recovered"], rec["steps"], rec["tokens"],
                                  rec["trainable_parameters"], f"{rec['seconds']:.0f}",
                                  entry["sparsity"]["revived_weights"]])
    if recovery_rows:
        sections.append("\n".join([
            "### SmolLM2-135M: recovery after one-shot Wanda 50 % (perplexity, wiki test protocol)", "",
            markdown_table(["fine-tuning", "dense", "Wanda 50 %", "after fine-tuning", "steps", "tokens",
                            "trainable parameters", "seconds", "revived weights"], recovery_rows), ""]))
    markdown = "# Sparse-training benchmark\n\n" + "\n".join(sections)
    (RESULTS / "sparse_training.md").write_text(markdown)
    write_json(RESULTS / "sparse_training.json", data)
    print(markdown)


PRUNED_DIR = Path(os.environ.get("PRUNEKIT_BENCH_CACHE", Path.home() / ".cache" / "prunekit" / "bench")) / "smollm2-wanda50"


def prepare() -> None:
    """Prune SmolLM2 with Wanda 50 % once (pinned wiki protocol) and measure dense and pruned perplexity."""
    from prunekit.core.text import TextProtocol, calibration_windows, test_windows
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.io.checkpoint import save_dense
    from prunekit.models.loading import load_model
    from prunekit.weights.pipeline import prune_weights

    lm = load_model()
    protocol = TextProtocol()
    test = test_windows(lm.tokenizer, protocol)
    dense = perplexity(lm.model, test).perplexity
    started = time.perf_counter()
    result = prune_weights(lm.model, "wanda", 0.5, calibration=calibration_windows(lm.tokenizer, protocol))
    seconds = time.perf_counter() - started
    pruned = perplexity(lm.model, test).perplexity
    PRUNED_DIR.parent.mkdir(parents=True, exist_ok=True)
    save_dense(lm.model, PRUNED_DIR, lm.tokenizer, overwrite=True)
    info = {"dense": dense, "pruned": pruned, "achieved": result.achieved_sparsity, "prune_seconds": seconds,
            "protocol": protocol.describe(), "environment": environment()}
    write_json(RESULTS / "sparse_training_recovery_prune.json", info)
    print(json.dumps({k: info[k] for k in ("dense", "pruned", "achieved", "prune_seconds")}))


def recovery(mode: str, steps: int, batch_size: int, seq_len: int, train_windows: int) -> None:
    from prunekit.training.recovery import RecoveryRecipe, run_recovery

    if not PRUNED_DIR.exists():
        raise SystemExit(f"run `{Path(__file__).name} prepare` first (it writes {PRUNED_DIR})")
    recipe = RecoveryRecipe(model=str(PRUNED_DIR), mode=mode, steps=steps, batch_size=batch_size,
                            train_seq_len=seq_len, train_windows=train_windows)
    started = time.perf_counter()
    result = run_recovery(recipe)
    result["wall_seconds"] = time.perf_counter() - started
    prepared = json.loads((RESULTS / "sparse_training_recovery_prune.json").read_text())
    result["perplexity"]["dense"] = prepared["dense"]  # measured by `prepare` on the same protocol
    write_json(RESULTS / f"sparse_training_recovery_{mode}.json", result)
    print(json.dumps({k: result[k] for k in ("perplexity", "sparsity")}, indent=2))


def smoke(out: Path) -> dict:
    """A few seconds of everything: two methods, one seed, a slice of the data (CI runs this)."""
    train, test = load_fashion_mnist("train", 600), load_fashion_mnist("test", 300)
    budget = {"epochs": 1, "finetune_epochs": 1, "train_limit": 600, "test_limit": 300, "model_settings": {"hidden": [32]}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sparse_training_mlp.json"
    runs = run_grid("mlp", budget, [0], [0.9], ["RigL", "lottery ticket (rewound)", "lottery mask, random re-init"],
                    path, (train, test))
    return {"runs": runs, "markdown": vision_markdown("mlp", json.loads(path.read_text()))[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    vision = sub.add_parser("vision")
    vision.add_argument("--model", choices=sorted(BUDGET), required=True)
    vision.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    vision.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    vision.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    vision.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    sub.add_parser("prepare")
    rec = sub.add_parser("recovery")
    rec.add_argument("--mode", choices=["full", "lora"], required=True)
    rec.add_argument("--steps", type=int, default=40)
    rec.add_argument("--batch-size", type=int, default=4)
    rec.add_argument("--seq-len", type=int, default=256)
    rec.add_argument("--train-windows", type=int, default=256)
    smoke_parser = sub.add_parser("smoke")
    smoke_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "vision":
        torch.set_num_threads(args.threads)
        budget = BUDGET[args.model]
        data = (load_fashion_mnist("train", budget["train_limit"]), load_fashion_mnist("test"))
        run_grid(args.model, budget, args.seeds, args.sparsities, args.methods,
                 RESULTS / f"sparse_training_{args.model}.json", data)
    elif args.command == "report":
        report(sorted(BUDGET))
    elif args.command == "prepare":
        torch.set_num_threads(2)
        prepare()
    elif args.command == "recovery":
        torch.set_num_threads(2)
        recovery(args.mode, args.steps, args.batch_size, args.seq_len, args.train_windows)
    else:
        print(smoke(args.out)["markdown"])


if __name__ == "__main__":
    sys.exit(main())

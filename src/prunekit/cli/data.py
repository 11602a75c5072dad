"""``prunekit data score | select | prune | list``: data pruning from the command line.

Run ``score`` under ``torchrun --nproc_per_node N -m prunekit data score ...`` to share the work
between processes (gloo on CPU); the scores are those of one process with the same ``--threads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli.app import app
from prunekit.cli.options import build_recipe, deprecated, grouped_key_values, key_values, run_job
from prunekit.errors import PrunekitError

data_app = typer.Typer(help="Data pruning: score every training example, keep a subset, write it.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

DATA_ARG = typer.Argument(None, help="data: a .jsonl/.csv/.tsv/.parquet/.txt or .npz/.pt/.safetensors file, "
                                     "or fashion-mnist[:train|test] [default: the recipe's]")
# shared options (typer needs them spelt out per command)
TEXT_FIELD = typer.Option(None, help="column holding the text (jsonl/csv/parquet) [default: text]")
LABEL_FIELD = typer.Option(None, help="column holding the class label [default: 'label' when present]")
NO_LABELS = typer.Option(False, "--no-labels", help="treat the data as unlabelled")
FEATURES = typer.Option(None, help="comma-separated numeric columns of tabular data [default: every numeric column]")
TEXT_UNIT = typer.Option(None, help="examples of a .txt file: line or paragraph (blank-line separated) [default: line]")
INPUT_KEY = typer.Option(None, help="array holding the inputs in .npz/.pt/.safetensors [default: inputs, x, images, ...]")
LIMIT = typer.Option(None, help="read only the first N examples")
RATIO = typer.Option(None, help="fraction of the examples removed, in [0, 1)")
KEEP = typer.Option(None, hidden=True, help="deprecated: the kept fraction, 1 - --ratio")
RECIPE = typer.Option(None, help="YAML recipe; options given here override it")


def _reading(text_field, label_field, no_labels, features, text_unit, input_key, limit) -> dict[str, Any]:
    columns = None
    if features is not None:
        columns = [c.strip() for c in features.split(",") if c.strip()]
        if not columns:
            raise PrunekitError("--features is empty")
    return {"reading.text_field": text_field, "reading.label_field": label_field, "reading.features": columns,
            "reading.text_unit": text_unit, "reading.input_key": input_key, "reading.limit": limit,
            "reading.labels": False if no_labels else None}


def _selection(prefix: str, score, ratio, keep, count, strategy, strategy_arg, balance, seed) -> tuple[dict, dict]:
    if keep is not None:
        ratio = deprecated("--keep", "--ratio (the fraction removed, 1 - keep)", 1.0 - keep, ratio)
    options = {f"{prefix}.score": score, f"{prefix}.ratio": ratio, f"{prefix}.count": count,
               f"{prefix}.balance": balance, f"{prefix}.seed": seed}
    return options, {f"{prefix}.strategy": (strategy, key_values(strategy_arg, "--strategy-arg"))}


def _score_recipe(recipe_type, recipe_file, data, score, score_arg, options: dict, methods: dict | None = None,
                  command: str = "score"):
    names = [s.strip().lower() for s in (score or []) if s.strip()]
    settings = grouped_key_values(score_arg, "--score-arg", names) if names else {}
    options = {**options, "data": data}
    if names:
        options["scores"] = [{"name": name, **settings.get(name, {})} for name in names]
    elif score_arg:
        raise PrunekitError("--score-arg needs the --score it sets")
    elif recipe_file is None:
        raise PrunekitError(f"Missing option '--score' (or a --recipe that names its scores; see "
                            f"`prunekit data {command} --help`)")
    return build_recipe(recipe_type, recipe_file, options, methods)


def _proxy(epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer, device) -> dict[str, Any]:
    return {"proxy.epochs": epochs, "proxy.seeds": seeds, "proxy.model": proxy_model, "proxy.cnn_width": cnn_width,
            "proxy.batch_size": batch_size, "proxy.lr": lr, "proxy.optimizer": optimizer, "proxy.device": device}


def _run_scoring(recipe, out: Path, overwrite: bool, threads: Optional[int]) -> None:
    from prunekit.core.distributed import joined_from_environment
    from prunekit.core.progress import set_enabled
    from prunekit.data.job import DataScoreJob

    with joined_from_environment() as world:
        if not world.is_writer:
            set_enabled(False)
        run_job(DataScoreJob(recipe, world), out, overwrite, threads, show=world.is_writer)


@data_app.command("score")
def score_command(
    data: Optional[str] = DATA_ARG,
    score: Optional[list[str]] = typer.Option(None, "--score", "-s", help="score to compute; repeatable (see `prunekit data list`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    score_arg: Optional[list[str]] = typer.Option(None, help="score setting SCORE.KEY=VALUE, e.g. el2n.epoch=2; repeatable"),
    epochs: Optional[int] = typer.Option(None, help="proxy training epochs (the learning-rate schedule spans them) [default: 3]"),
    seeds: Optional[int] = typer.Option(None, help="independent proxy runs averaged (as the EL2N/GraNd paper does) [default: 3]"),
    proxy_model: Optional[str] = typer.Option(None, "--proxy", help="proxy model: auto, cnn (images) or mlp (vectors) [default: auto]"),
    cnn_width: Optional[int] = typer.Option(None, help="channels of the cnn proxy's first layer [default: 16]"),
    batch_size: Optional[int] = typer.Option(None, help="proxy training batch size [default: 128]"),
    lr: Optional[float] = typer.Option(None, help="proxy learning rate (cosine schedule) [default: 0.05]"),
    optimizer: Optional[str] = typer.Option(None, help="sgd (momentum 0.9, Nesterov) or adamw [default: sgd]"),
    encoder: Optional[str] = typer.Option(None, help="sentence encoder for text [default: all-MiniLM-L6-v2]"),
    text_batch_size: Optional[int] = typer.Option(None, help="texts per batch when embedding [default: 16]"),
    seed: Optional[int] = typer.Option(None, help="seed of the random score (proxy seeds are 0..seeds-1) [default: 0]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda for the proxy [default: cpu]"),
    threads: Optional[int] = typer.Option(None, help="torch threads per process [default: torch's choice]"),
    text_field: Optional[str] = TEXT_FIELD, label_field: Optional[str] = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: Optional[str] = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Score every example: writes scores.csv (index, label, one column per score), scores.json and report.md."""
    from prunekit.cli.contract import check_device
    from prunekit.data.job import DataScoreRecipe

    check_device(device)
    options = {**_proxy(epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer, device),
               **_reading(text_field, label_field, no_labels, features, text_unit, input_key, limit),
               "encoder": encoder, "text_batch_size": text_batch_size, "seed": seed}
    built = _score_recipe(DataScoreRecipe, recipe, data, score, score_arg, options)
    _run_scoring(built, out, overwrite, threads)


@data_app.command("select")
def select_command(
    scores: Optional[str] = typer.Argument(None, help="a scores directory (or its scores.csv) from `prunekit data score`"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    score: Optional[str] = typer.Option(None, "--score", "-s", help="score to select by [default: the only one]"),
    ratio: Optional[float] = RATIO,
    count: Optional[int] = typer.Option(None, help="number of examples kept (instead of --ratio)"),
    strategy: Optional[str] = typer.Option(None, help="hardest, easiest, middle, random or ccs [default: hardest]"),
    strategy_arg: Optional[list[str]] = typer.Option(
        None, help="strategy setting KEY=VALUE, e.g. hard_cut=0.2, strata=50, start=0.1"),
    balance: Optional[str] = typer.Option(None, help="class balance: none, proportional (keep each class's share) or "
                                                     "equal [default: none]"),
    seed: Optional[int] = typer.Option(None, help="seed for ties and random choices [default: 0]"),
    data: Optional[str] = typer.Option(None, "--data", help="the scored data: also write the selected rows in its format"),
    text_field: Optional[str] = TEXT_FIELD, label_field: Optional[str] = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: Optional[str] = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    keep: Optional[float] = KEEP,
) -> None:
    """Choose the kept examples from scores: writes indices.txt, selection.json, report.md (and the data subset)."""
    from prunekit.data.job import DataSelectJob, DataSelectRecipe

    selection, methods = _selection("selection", score, ratio, keep, count, strategy, strategy_arg, balance, seed)
    options = {"scores": scores, "data": data, **selection,
               **_reading(text_field, label_field, no_labels, features, text_unit, input_key, limit)}
    built = build_recipe(DataSelectRecipe, recipe, options, methods)
    run_job(DataSelectJob(built), out, overwrite)


@data_app.command("prune")
def prune_command(
    data: Optional[str] = DATA_ARG,
    score: Optional[list[str]] = typer.Option(None, "--score", "-s", help="score to compute and select by (the first one); repeatable"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    ratio: Optional[float] = RATIO,
    count: Optional[int] = typer.Option(None, help="number of examples kept (instead of --ratio)"),
    strategy: Optional[str] = typer.Option(None, help="hardest, easiest, middle, random or ccs [default: hardest]"),
    strategy_arg: Optional[list[str]] = typer.Option(None, help="strategy setting KEY=VALUE; repeatable"),
    balance: Optional[str] = typer.Option(None, help="class balance: none, proportional or equal [default: none]"),
    select_by: Optional[str] = typer.Option(None, help="score to select by [default: the first --score]"),
    score_arg: Optional[list[str]] = typer.Option(None, help="score setting SCORE.KEY=VALUE; repeatable"),
    epochs: Optional[int] = typer.Option(None, help="proxy training epochs [default: 3]"),
    seeds: Optional[int] = typer.Option(None, help="independent proxy runs averaged [default: 3]"),
    proxy_model: Optional[str] = typer.Option(None, "--proxy", help="proxy model: auto, cnn or mlp [default: auto]"),
    cnn_width: Optional[int] = typer.Option(None, help="channels of the cnn proxy's first layer [default: 16]"),
    batch_size: Optional[int] = typer.Option(None, help="proxy training batch size [default: 128]"),
    lr: Optional[float] = typer.Option(None, help="proxy learning rate [default: 0.05]"),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adamw [default: sgd]"),
    encoder: Optional[str] = typer.Option(None, help="sentence encoder for text [default: all-MiniLM-L6-v2]"),
    text_batch_size: Optional[int] = typer.Option(None, help="texts per batch when embedding [default: 16]"),
    seed: Optional[int] = typer.Option(None, help="seed of the random score and of the selection [default: 0]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda for the proxy [default: cpu]"),
    threads: Optional[int] = typer.Option(None, help="torch threads per process"),
    text_field: Optional[str] = TEXT_FIELD, label_field: Optional[str] = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: Optional[str] = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    keep: Optional[float] = KEEP,
) -> None:
    """Score, select and write the pruned data in one go (scores.csv, indices.txt, data.<ext>, reports)."""
    from prunekit.cli.contract import check_device
    from prunekit.data.job import DataScoreRecipe

    check_device(device)
    selection, methods = _selection("selection", select_by, ratio, keep, count, strategy, strategy_arg, balance, seed)
    options = {**_proxy(epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer, device),
               **_reading(text_field, label_field, no_labels, features, text_unit, input_key, limit),
               "encoder": encoder, "text_batch_size": text_batch_size, "seed": seed, **selection}
    if recipe is None and options.get("selection.ratio") is None and options.get("selection.count") is None:
        raise PrunekitError("give the fraction of examples removed (--ratio) or the number kept (--count)")
    built = _score_recipe(DataScoreRecipe, recipe, data, score, score_arg, options, methods, "prune")
    _run_scoring(built, out, overwrite, threads)


@data_app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The scores and selection strategies, with their settings."""
    from prunekit.data.job import describe_methods, dumps

    methods = describe_methods()
    if as_json:
        typer.echo(dumps(methods))
        return
    from rich.console import Console
    from rich.table import Table

    for kind in ("scores", "strategies"):
        table = Table(title=kind)
        for column in ("name", "what", "settings"):
            table.add_column(column)
        for item in methods[kind]:
            settings = ", ".join(f"{k}={v}" for k, v in item["settings"].items()) or "–"
            extra = f" ({item['harder']} = harder{', needs labels' if item['needs_labels'] else ''})" if kind == "scores" else ""
            table.add_row(item["name"], item["summary"] + extra, settings)
        Console().print(table)

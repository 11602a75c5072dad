"""``prunekit data score | select | prune | list``: data pruning from the command line.

Run ``score`` under ``torchrun --nproc_per_node N -m prunekit data score ...`` to share the work
between processes (gloo on CPU); the scores are those of one process with the same ``--threads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.errors import PrunekitError

data_app = typer.Typer(help="Data pruning: score every training example, keep a subset, write it.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

DATA_ARG = typer.Argument(..., help="data: a .jsonl/.csv/.tsv/.parquet/.txt or .npz/.pt/.safetensors file, "
                                    "or fashion-mnist[:train|test]")


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text.strip() else ""


def _score_settings(items: list[str] | None, scores: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` items grouped by score name."""
    settings: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not name or not field:
            raise PrunekitError(f"--score-arg '{item}' must look like SCORE.KEY=VALUE, e.g. el2n.epoch=2")
        if name.lower() not in [s.lower() for s in scores]:
            raise PrunekitError(f"--score-arg '{item}' names score '{name}', which is not among --score {', '.join(scores)}")
        settings.setdefault(name.lower(), {})[field] = _yaml_value(value)
    return settings


def _key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"{what} '{item}' must look like KEY=VALUE")
        result[key.strip()] = _yaml_value(value)
    return result


def _data_options(text_field: str, label_field: str, no_labels: bool, features: Optional[str], text_unit: str,
                  input_key: Optional[str], limit: Optional[int]):
    from prunekit.data.job import DataOptions

    columns = [c.strip() for c in features.split(",") if c.strip()] if features else None
    if features is not None and not columns:
        raise PrunekitError("--features is empty")
    return DataOptions(text_field=text_field, label_field=None if no_labels else label_field, features=columns,
                       text_unit=text_unit, input_key=input_key, limit=limit)


def _threads(threads: Optional[int]) -> None:
    contract.apply_threads(threads)


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


# shared options (typer needs them spelt out per command)
TEXT_FIELD = typer.Option("text", help="column holding the text (jsonl/csv/parquet)")
LABEL_FIELD = typer.Option("auto", help="column holding the class label [default: 'label' when present]")
NO_LABELS = typer.Option(False, "--no-labels", help="treat the data as unlabelled")
FEATURES = typer.Option(None, help="comma-separated numeric columns of tabular data [default: every numeric column]")
TEXT_UNIT = typer.Option("line", help="examples of a .txt file: line or paragraph (blank-line separated)")
INPUT_KEY = typer.Option(None, help="array holding the inputs in .npz/.pt/.safetensors [default: inputs, x, images, ...]")
LIMIT = typer.Option(None, help="fashion-mnist only: keep the first N examples")


def _scoring_arguments(score: list[str], score_arg: Optional[list[str]], epochs: int, seeds: int, proxy_model: str,
                       cnn_width: int, batch_size: int, lr: float, optimizer: str, device: str):
    from prunekit.data.proxy import ProxyConfig

    names = [s.strip().lower() for s in score if s.strip()]
    if not names:
        raise PrunekitError("give at least one --score")
    contract.check_device(device)
    settings = _score_settings(score_arg, names)
    specs = [(name, settings.get(name, {})) for name in names]
    proxy = ProxyConfig(model=proxy_model, epochs=epochs, seeds=seeds, batch_size=batch_size, lr=lr,
                        optimizer=optimizer, cnn_width=cnn_width, device=device)
    return specs, proxy


@data_app.command("score")
def score_command(
    data: str = DATA_ARG,
    score: list[str] = typer.Option(..., "--score", "-s", help="score to compute; repeatable (see `prunekit data list`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    score_arg: Optional[list[str]] = typer.Option(None, help="score setting SCORE.KEY=VALUE, e.g. el2n.epoch=2; repeatable"),
    epochs: int = typer.Option(3, help="proxy training epochs (the learning-rate schedule spans them)"),
    seeds: int = typer.Option(3, help="independent proxy runs averaged (as the EL2N/GraNd paper does)"),
    proxy_model: str = typer.Option("auto", "--proxy", help="proxy model: auto, cnn (images) or mlp (vectors)"),
    cnn_width: int = typer.Option(16, help="channels of the cnn proxy's first layer"),
    batch_size: int = typer.Option(128, help="proxy training batch size"),
    lr: float = typer.Option(0.05, help="proxy learning rate (cosine schedule)"),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9, Nesterov) or adamw"),
    encoder: Optional[str] = typer.Option(None, help="sentence encoder for text [default: all-MiniLM-L6-v2]"),
    text_batch_size: int = typer.Option(16, help="texts per batch when embedding"),
    seed: int = typer.Option(0, help="seed of the random score (proxy seeds are 0..seeds-1)"),
    device: str = typer.Option("cpu", help="cpu or cuda for the proxy"),
    threads: Optional[int] = typer.Option(None, help="torch threads per process [default: torch's choice]"),
    text_field: str = TEXT_FIELD, label_field: str = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: str = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Score every example: writes scores.csv (index, label, one column per score), scores.json and report.md."""
    _run_scoring(data, score, out, score_arg, epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer,
                 encoder, text_batch_size, seed, device, threads, text_field, label_field, no_labels, features,
                 text_unit, input_key, limit, overwrite, None)


def _run_scoring(data, score, out, score_arg, epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer,
                 encoder, text_batch_size, seed, device, threads, text_field, label_field, no_labels, features,
                 text_unit, input_key, limit, overwrite, select_options) -> None:
    from prunekit.core.progress import set_enabled
    from prunekit.core.distributed import joined_from_environment
    from prunekit.data.job import run_score_job

    _threads(threads)
    if text_batch_size < 1:
        raise PrunekitError(f"--text-batch-size must be at least 1, got {text_batch_size}")
    specs, proxy = _scoring_arguments(score, score_arg, epochs, seeds, proxy_model, cnn_width, batch_size, lr,
                                      optimizer, device)
    options = _data_options(text_field, label_field, no_labels, features, text_unit, input_key, limit)
    with joined_from_environment() as world:
        if not world.is_writer:
            set_enabled(False)
        table, selection, out_path = run_score_job(data, specs, out, overwrite, options, proxy, seed, encoder,
                                                   text_batch_size, select_options, world)
    if not world.is_writer:
        return
    timings = table.meta["timings"]
    rows = [("data", f"{table.meta['data']['description']} ({len(table)} rows)"),
            ("scores", ", ".join(table.names)),
            ("processes", f"{world.world_size} × {table.meta['threads_per_process']} threads"),
            ("time", f"{timings['total_seconds']:.1f} s")]
    if selection is not None:
        rows.append(("kept", f"{len(selection)} of {selection.total} ({selection.fraction:.2%}) by "
                             f"{selection.meta['score']}, {selection.meta['strategy']['name']}"))
    rows.append(("written", f"{out_path}"))
    _print_table("prunekit data", rows)


@data_app.command("select")
def select_command(
    scores: Path = typer.Argument(..., help="a scores directory (or its scores.csv) from `prunekit data score`"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    score: Optional[str] = typer.Option(None, "--score", "-s", help="score to select by [default: the only one]"),
    keep: Optional[float] = typer.Option(None, help="fraction of examples kept, in (0, 1]"),
    count: Optional[int] = typer.Option(None, help="number of examples kept (instead of --keep)"),
    strategy: str = typer.Option("hardest", help="hardest, easiest, middle, random or ccs"),
    strategy_arg: Optional[list[str]] = typer.Option(
        None, help="strategy setting KEY=VALUE, e.g. hard_cut=0.2, strata=50, start=0.1"),
    balance: str = typer.Option("none", help="class balance: none, proportional (keep each class's share) or equal"),
    seed: int = typer.Option(0, help="seed for ties and random choices"),
    data: Optional[str] = typer.Option(None, "--data", help="the scored data: also write the selected rows in its format"),
    text_field: str = TEXT_FIELD, label_field: str = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: str = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Choose the kept examples from scores: writes indices.txt, selection.json, report.md (and the data subset)."""
    from prunekit.data.job import SelectOptions, run_select_job

    options = SelectOptions(score=score, keep=keep, count=count, strategy=strategy, balance=balance, seed=seed,
                            settings=_key_values(strategy_arg, "--strategy-arg"))
    data_options = _data_options(text_field, label_field, no_labels, features, text_unit, input_key, limit)
    selection, out_path = run_select_job(scores, out, options, data, data_options, overwrite)
    meta = selection.meta
    _print_table("prunekit data select", [
        ("kept", f"{len(selection)} of {selection.total} ({selection.fraction:.2%})"),
        ("by", f"{meta['score']} ({meta['harder']} = harder), {meta['strategy']['name']}, balance {meta['balance']}"),
        ("written", f"{out_path}" + (f" ({meta['written']})" if meta.get("written") else ""))])


@data_app.command("prune")
def prune_command(
    data: str = DATA_ARG,
    score: list[str] = typer.Option(..., "--score", "-s", help="score to compute and select by (the first one); repeatable"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    keep: Optional[float] = typer.Option(None, help="fraction of examples kept, in (0, 1]"),
    count: Optional[int] = typer.Option(None, help="number of examples kept (instead of --keep)"),
    strategy: str = typer.Option("hardest", help="hardest, easiest, middle, random or ccs"),
    strategy_arg: Optional[list[str]] = typer.Option(None, help="strategy setting KEY=VALUE; repeatable"),
    balance: str = typer.Option("none", help="class balance: none, proportional or equal"),
    select_by: Optional[str] = typer.Option(None, help="score to select by [default: the first --score]"),
    score_arg: Optional[list[str]] = typer.Option(None, help="score setting SCORE.KEY=VALUE; repeatable"),
    epochs: int = typer.Option(3, help="proxy training epochs"),
    seeds: int = typer.Option(3, help="independent proxy runs averaged"),
    proxy_model: str = typer.Option("auto", "--proxy", help="proxy model: auto, cnn or mlp"),
    cnn_width: int = typer.Option(16, help="channels of the cnn proxy's first layer"),
    batch_size: int = typer.Option(128, help="proxy training batch size"),
    lr: float = typer.Option(0.05, help="proxy learning rate"),
    optimizer: str = typer.Option("sgd", help="sgd or adamw"),
    encoder: Optional[str] = typer.Option(None, help="sentence encoder for text [default: all-MiniLM-L6-v2]"),
    text_batch_size: int = typer.Option(16, help="texts per batch when embedding"),
    seed: int = typer.Option(0, help="seed of the random score and of the selection"),
    device: str = typer.Option("cpu", help="cpu or cuda for the proxy"),
    threads: Optional[int] = typer.Option(None, help="torch threads per process"),
    text_field: str = TEXT_FIELD, label_field: str = LABEL_FIELD, no_labels: bool = NO_LABELS,
    features: Optional[str] = FEATURES, text_unit: str = TEXT_UNIT, input_key: Optional[str] = INPUT_KEY,
    limit: Optional[int] = LIMIT,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Score, select and write the pruned data in one go (scores.csv, indices.txt, data.<ext>, reports)."""
    from prunekit.data.job import SelectOptions

    names = [s.strip().lower() for s in score if s.strip()]
    options = SelectOptions(score=(select_by or (names[0] if names else None)), keep=keep, count=count,
                            strategy=strategy, balance=balance, seed=seed,
                            settings=_key_values(strategy_arg, "--strategy-arg"))
    _run_scoring(data, score, out, score_arg, epochs, seeds, proxy_model, cnn_width, batch_size, lr, optimizer,
                 encoder, text_batch_size, seed, device, threads, text_field, label_field, no_labels, features,
                 text_unit, input_key, limit, overwrite, options)


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

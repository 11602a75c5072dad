"""``prunekit prune``, ``prunekit sweep`` and ``prunekit eval``: one-shot weight pruning of language models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.core.progress import console
from prunekit.errors import PrunekitError



def _key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``key=value`` strings; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"{what} '{item}' must look like key=value")
        result[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return result


def _overrides(items: list[str] | None) -> dict[str, float]:
    result = {}
    for key, value in _key_values(items, "--layer-sparsity").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunekitError(f"--layer-sparsity {key}={value}: the sparsity must be a number")
        result[key] = float(value)
    return result


def _build_recipe(recipe_file: Optional[Path], settings: dict[str, Any], data: dict[str, Any],
                  method_args: dict[str, Any], allocation_args: dict[str, Any]):
    from prunekit.weights.recipe import WeightPruningRecipe

    base: dict[str, Any] = {}
    if recipe_file is not None:
        base = WeightPruningRecipe.from_yaml(recipe_file).model_dump(mode="json", by_alias=True)
    for key, value in settings.items():
        if value is not None:
            base[key] = value
    if data:
        base["data"] = {**base.get("data", {}), **{k: v for k, v in data.items() if v is not None}}
    if method_args or settings.get("method") is not None:
        current = base.get("method", {"name": "wanda"})
        name = settings.get("method") or (current["name"] if isinstance(current, dict) else current)
        previous = current if isinstance(current, dict) and current.get("name") == name else {}
        base["method"] = {**{k: v for k, v in previous.items()}, "name": name, **method_args}
    if allocation_args or settings.get("allocation") is not None:
        current = base.get("allocation", {"name": "uniform"})
        name = settings.get("allocation") or (current["name"] if isinstance(current, dict) else current)
        previous = current if isinstance(current, dict) and current.get("name") == name else {}
        base["allocation"] = {**previous, "name": name, **allocation_args}
    return WeightPruningRecipe.build(base, where="settings")


MODEL_ARG = typer.Argument(None, help="model directory or hub id; default: the embedded SmolLM2-135M")


@app.command()
def prune(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    method: Optional[str] = typer.Option(None, help="magnitude, wanda or sparsegpt [default: wanda]"),
    sparsity: Optional[float] = typer.Option(None, help="target sparsity in [0, 1) [default: 0.5, or the pattern's]"),
    pattern: Optional[str] = typer.Option(None, help="unstructured, or N:M such as 2:4 [default: unstructured]"),
    allocation: Optional[str] = typer.Option(None, help="uniform, owl or global [default: uniform]"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text: wiki, or a .txt/.jsonl file [default: wiki]"),
    test: Optional[str] = typer.Option(None, "--test", help="test text for perplexity: wiki or a file [default: wiki]"),
    calib_samples: Optional[int] = typer.Option(None, help="calibration windows [default: 32]"),
    test_windows: Optional[int] = typer.Option(None, help="test windows [default: 40]"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per window [default: 512]"),
    seed: Optional[int] = typer.Option(None, help="seed of the calibration windows [default: 0]"),
    text_field: Optional[str] = typer.Option(None, help="field holding the text in .jsonl files [default: text]"),
    evaluate: Optional[bool] = typer.Option(None, "--eval/--no-eval", help="measure perplexity before and after [default: on]"),
    include: Optional[list[str]] = typer.Option(None, help="layers to prune (glob, or re:regex); repeatable"),
    exclude: Optional[list[str]] = typer.Option(None, help="layers to leave dense (glob, or re:regex); repeatable"),
    layer_sparsity: Optional[list[str]] = typer.Option(None, help="per-layer override PATTERN=SPARSITY; repeatable"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting KEY=VALUE, e.g. dampening=0.01"),
    allocation_arg: Optional[list[str]] = typer.Option(None, help="allocation setting, e.g. threshold_m=5 or lambda=0.08"),
    sequential: Optional[str] = typer.Option(None, help="layer (one pass, later layers see pruned earlier ones) or block (reference two-pass order)"),
    batch_size: Optional[int] = typer.Option(None, help="windows per forward pass [default: 4]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16: computed and stored in this dtype, streamed or not [default: float32]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; under torchrun one GPU per process, NCCL [default: cpu]"),
    codec: Optional[str] = typer.Option(None, help="entropy coding of the compressed copy: zstd or none [default: zstd]"),
    dense: Optional[bool] = typer.Option(None, "--dense/--no-dense", help="write the from_pretrained-loadable model; with --stream, off writes compressed/ only [default: on]"),
    compressed: Optional[bool] = typer.Option(None, "--compressed/--no-compressed", help="write the compressed copy [default: on]"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="out-of-core: one block in memory at a time, shards written as they finish [default: off]"),
    resume: bool = typer.Option(False, help="continue an interrupted --stream run: the same command and --out (implies --stream); a finished one is left as it is"),
    untie_embeddings: bool = typer.Option(False, help="give lm_head its own copy of a tied embedding so it can be pruned alone"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the model directory"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
) -> None:
    """Prune a causal language model's weights and write it, its compressed copy and a report."""
    from prunekit.weights.job import run_prune_job

    contract.apply_threads(threads)
    settings = {"model": model, "sparsity": sparsity, "pattern": pattern, "method": method, "allocation": allocation,
                "evaluate": evaluate, "include": include or None, "exclude": exclude or None,
                "overrides": _overrides(layer_sparsity) or None, "sequential": sequential, "batch_size": batch_size,
                "dtype": dtype, "device": device, "codec": codec, "save_dense": dense, "save_compressed": compressed,
                "untie_embeddings": untie_embeddings or None, "trust_remote_code": trust_remote_code or None,
                "stream": stream}
    data = {"calibration": calib, "test": test, "calibration_samples": calib_samples, "test_windows": test_windows,
            "seq_len": seq_len, "seed": seed, "text_field": text_field}
    built = _build_recipe(recipe, settings, data, _key_values(method_arg, "--method-arg"),
                          _key_values(allocation_arg, "--allocation-arg"))
    if not (built.save_dense or built.save_compressed):
        raise PrunekitError("--no-dense and --no-compressed together would write no model")
    contract.check_device(built.device)
    outcome = run_prune_job(built, out, overwrite, resume=resume)
    if outcome.out_dir is not None:  # under torchrun only rank 0 writes and reports
        _print_summary(outcome.report, outcome.out_dir)


def _print_summary(report: dict, out_dir: Path | None) -> None:
    table = Table(title=f"prunekit: {report['model']['name']}", show_header=False)
    ppl = report["perplexity"]
    size = report["size"]
    table.add_row("method", f"{report['method']['name']} · {report['pattern']} · {report['allocation']['name']}")
    table.add_row("sparsity", f"target {report['sparsity']['target']:.2%}, achieved {report['sparsity']['achieved_in_targets']:.2%} "
                              f"of targeted weights ({report['sparsity']['achieved_in_model']:.2%} of all)")
    if ppl["before"] is not None:
        table.add_row("perplexity", f"{ppl['before']:.3f} → {ppl['after']:.3f}")
    table.add_row("prune time", f"{report['timing']['prune_seconds']:.1f} s"
                  + (f" ({report['run']['processes']} processes)" if report.get("run", {}).get("processes", 1) > 1 else "")
                  + (" (streamed)" if report.get("run", {}).get("streamed") else ""))
    table.add_row("peak RSS (pruning)", f"{report['memory']['peak_rss_during_prune_bytes'] / 2**20:.0f} MiB")
    if size.get("compressed_bytes"):
        table.add_row("size on disk", f"dense {size['dense_bytes'] / 2**20:.1f} MiB → compressed "
                                      f"{size['compressed_bytes'] / 2**20:.1f} MiB ({size['compressed_ratio']:.1%})")
    table.add_row("protocol", f"calibration {report['protocol']['calibration_windows']}; "
                              f"test {report['protocol']['test_protocol']}")
    table.add_row("note", "masks do not speed up dense CPU kernels (see report.md)")
    if out_dir is not None:
        table.add_row("written", f"{out_dir} (report.md, report.json, sparsity.png, compressed/)")
    typer.echo("")
    from rich.console import Console

    Console().print(table)


@app.command()
def sweep(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory for sweep.json, sweep.md and sweep.png"),
    sparsities: str = typer.Option("0.1,0.3,0.5,0.6,0.7", help="comma-separated sparsities"),
    method: Optional[str] = typer.Option(None, help="magnitude, wanda or sparsegpt [default: wanda]"),
    allocation: Optional[str] = typer.Option(None, help="uniform, owl or global [default: uniform]"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text: wiki or a file"),
    test: Optional[str] = typer.Option(None, "--test", help="test text: wiki or a file"),
    calib_samples: Optional[int] = typer.Option(None, help="calibration windows [default: 32]"),
    test_windows: Optional[int] = typer.Option(None, help="test windows [default: 40]"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per window [default: 512]"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Prune at several sparsities and plot perplexity against sparsity."""
    from prunekit.core.patterns import check_sparsity
    from prunekit.weights.job import run_sweep

    try:
        values = [check_sparsity(float(v)) for v in sparsities.split(",") if v.strip()]
    except ValueError:
        raise PrunekitError(f"--sparsities must be comma-separated numbers, got '{sparsities}'") from None
    if not values:
        raise PrunekitError("--sparsities is empty")
    settings = {"model": model, "method": method, "allocation": allocation}
    data = {"calibration": calib, "test": test, "calibration_samples": calib_samples, "test_windows": test_windows,
            "seq_len": seq_len}
    built = _build_recipe(recipe, settings, data, {}, {})
    outcome = run_sweep(built, values, out, overwrite)
    typer.echo(outcome.markdown)


@app.command("eval")
def evaluate_command(
    model: Optional[str] = MODEL_ARG,
    test: str = typer.Option("wiki", "--test", help="test text: wiki or a .txt/.jsonl file"),
    test_windows: int = typer.Option(40, help="number of windows"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    text_field: str = typer.Option("text", help="field holding the text in .jsonl files"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Measure a model's perplexity (a pruned output directory, its compressed/ copy, or any causal LM)."""
    from prunekit.core.text import TextProtocol, test_windows as make_windows
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.models.loading import CAUSAL_LM, load_model
    from prunekit.weights.job import model_sparsity

    protocol = TextProtocol(test=test, test_windows=test_windows, seq_len=seq_len, text_field=text_field)
    loaded = load_model(model, kind=CAUSAL_LM)
    result = perplexity(loaded.model, make_windows(loaded.require_tokenizer(), protocol), batch_size)
    info = {"model": loaded.name, "perplexity": result.perplexity, "mean_loss": result.mean_loss,
            "sparsity": model_sparsity(loaded.model), "windows": result.windows, "seq_len": result.seq_len,
            "test": protocol.describe()["test_split"], "protocol": protocol.describe()["test_protocol"]}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"perplexity of {loaded.name}", show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)

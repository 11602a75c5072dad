"""``prunekit prune``, ``prunekit sweep`` and ``prunekit eval``: one-shot weight pruning of language models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.cli.options import BLOCKS, build_recipe, deprecated, key_values, numbers, run_job
from prunekit.errors import PrunekitError

MODEL_ARG = typer.Argument(None, help="model directory or hub id; default: the embedded SmolLM2-135M")
RECIPE = typer.Option(None, help="YAML recipe; options given here override it")


def _overrides(items: list[str] | None, option: str) -> dict[str, float] | None:
    result = {}
    for key, value in key_values(items, option, split_at_last=True).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunekitError(f"{option} {key}={value}: the ratio must be a number")
        result[key] = float(value)
    return result or None


TASKS = typer.Option(None, "--tasks", help="zero-shot tasks scored with lm-eval, comma-separated: wiki_lastword, "
                                          "wiki_continuation [default: none]")
TASK_EXAMPLES = typer.Option(None, help="examples per task [default: 200]")
TASK_SEED = typer.Option(None, help="seed that builds the tasks' examples [default: 0]")


def _tasks(tasks: str | None, examples: int | None, seed: int | None) -> dict[str, Any]:
    names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks is not None else None
    return {"tasks.names": names, "tasks.examples": examples, "tasks.seed": seed}


def _data(calib, test, calib_samples, test_windows, seq_len, seed, text_field) -> dict[str, Any]:
    return {"data.calibration": calib, "data.test": test, "data.calibration_samples": calib_samples,
            "data.test_windows": test_windows, "data.seq_len": seq_len, "data.seed": seed,
            "data.text_field": text_field}


@app.command()
def prune(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    method: Optional[str] = typer.Option(None, help="magnitude, wanda or sparsegpt [default: wanda]"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the targeted weights removed, in [0, 1) "
                                                     "[default: 0.5, or the pattern's]"),
    pattern: Optional[str] = typer.Option(None, help="unstructured, or N:M such as 2:4 [default: unstructured]"),
    allocation: Optional[str] = typer.Option(None, help="uniform, owl, global, or by measurement: knapsack or "
                                                        "evolutionary (see docs/weights.md) [default: uniform]"),
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
    layer_ratio: Optional[list[str]] = typer.Option(None, help="per-layer override PATTERN=RATIO; repeatable"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting KEY=VALUE, e.g. dampening=0.01"),
    allocation_arg: Optional[list[str]] = typer.Option(None, help="allocation setting, e.g. threshold_m=5, lambda=0.08, "
                                                                  "generations=20 or stage_tokens=[512,2048]"),
    sequential: Optional[str] = typer.Option(None, help="layer (one pass, later layers see pruned earlier ones) or block (reference two-pass order)"),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="fit each layer to the dense model's output from "
                                    "the pruned model's inputs (one more forward pass; layer order only)"),
    batch_size: Optional[int] = typer.Option(None, help="windows per forward pass [default: 4]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16: computed and stored in this dtype, streamed or not [default: float32]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; under torchrun one GPU per process, NCCL [default: cpu]"),
    codec: Optional[str] = typer.Option(None, help="entropy coding of the compressed copy: zstd or none [default: zstd]"),
    compressed_format: Optional[str] = typer.Option(None, "--format", help="format of the compressed copy: prunekit "
                                                    "(bitmask + zstd, the smallest) or compressed-tensors "
                                                    "(llm-compressor's sparse layout) [default: prunekit]"),
    dense: Optional[bool] = typer.Option(None, "--dense/--no-dense", help="write the from_pretrained-loadable model; with --stream, off writes compressed/ only [default: on]"),
    compressed: Optional[bool] = typer.Option(None, "--compressed/--no-compressed", help="write the compressed copy [default: on]"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="out-of-core: one block in memory at a time, shards written as they finish [default: off]"),
    resume: bool = typer.Option(False, help="continue an interrupted --stream run: the same command and --out (implies --stream); a finished one is left as it is"),
    untie_embeddings: bool = typer.Option(False, help="give lm_head its own copy of a tied embedding so it can be pruned alone"),
    tasks: Optional[str] = TASKS,
    task_examples: Optional[int] = TASK_EXAMPLES,
    task_seed: Optional[int] = TASK_SEED,
    lowrank_budget: Optional[float] = typer.Option(None, help="add a rank-r correction per pruned layer, fitted to its "
                                                              "pruning error, with at most this fraction of extra "
                                                              "parameters, e.g. 0.1 [default: 0, none]"),
    lowrank_kind: Optional[str] = typer.Option(None, help="what the budget buys: correction (S + L·R, a rank-r term "
                                                          "beside the sparse weight) or armor (A·S·B, block-diagonal "
                                                          "A and B fitted around it) [default: correction]"),
    lowrank_refit: bool = typer.Option(False, "--lowrank-refit", help="with the correction: refit the sparse part's "
                                       "kept values by least squares in every round (slower, a smaller error)"),
    blocks: Optional[str] = BLOCKS,
    trust_remote_code: bool = typer.Option(False, help="allow model code from the model directory"),
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    sparsity: Optional[float] = typer.Option(None, hidden=True, help="deprecated: --ratio"),
    layer_sparsity: Optional[list[str]] = typer.Option(None, hidden=True, help="deprecated: --layer-ratio"),
) -> None:
    """Prune a causal language model's weights and write it, its compressed copy and a report."""
    from prunekit.weights.job import prune_job
    from prunekit.weights.recipe import WeightPruningRecipe

    ratio = deprecated("--sparsity", "--ratio", sparsity, ratio)
    overrides = _overrides(layer_ratio, "--layer-ratio")
    if layer_sparsity:
        overrides = deprecated("--layer-sparsity", "--layer-ratio", _overrides(layer_sparsity, "--layer-sparsity"),
                               overrides)
    options = {"model": model, "ratio": ratio, "pattern": pattern, "evaluate": evaluate, "include": include or None,
               "exclude": exclude or None, "overrides": overrides, "sequential": sequential,
               "asymmetric": asymmetric or None, "batch_size": batch_size, "dtype": dtype, "device": device, "codec": codec,
               "format": compressed_format, "save_dense": dense,
               "save_compressed": compressed, "untie_embeddings": untie_embeddings or None, "blocks": blocks,
               "trust_remote_code": trust_remote_code or None, "stream": stream, "lowrank.budget": lowrank_budget,
               "lowrank.kind": lowrank_kind, "lowrank.refit": lowrank_refit or None,
               **_data(calib, test, calib_samples, test_windows, seq_len, seed, text_field),
               **_tasks(tasks, task_examples, task_seed)}
    built = build_recipe(WeightPruningRecipe, recipe, options,
                         {"method": (method, key_values(method_arg, "--method-arg")),
                          "allocation": (allocation, key_values(allocation_arg, "--allocation-arg"))})
    if not (built.save_dense or built.save_compressed):
        raise PrunekitError("--no-dense and --no-compressed together would write no model")
    contract.check_device(built.device)
    run_job(prune_job(built, resume), out, overwrite, threads)


@app.command()
def sweep(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory for the report and sweep.png"),
    ratios: Optional[str] = typer.Option(None, help="comma-separated ratios [default: 0.1,0.3,0.5,0.6,0.7]"),
    method: Optional[str] = typer.Option(None, help="magnitude, wanda or sparsegpt [default: wanda]"),
    allocation: Optional[str] = typer.Option(None, help="uniform, owl or global [default: uniform]"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting KEY=VALUE"),
    allocation_arg: Optional[list[str]] = typer.Option(None, help="allocation setting KEY=VALUE"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text: wiki or a file"),
    test: Optional[str] = typer.Option(None, "--test", help="test text: wiki or a file"),
    calib_samples: Optional[int] = typer.Option(None, help="calibration windows [default: 32]"),
    test_windows: Optional[int] = typer.Option(None, help="test windows [default: 40]"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per window [default: 512]"),
    seed: Optional[int] = typer.Option(None, help="seed of the calibration windows [default: 0]"),
    blocks: Optional[str] = BLOCKS,
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    sparsities: Optional[str] = typer.Option(None, hidden=True, help="deprecated: --ratios"),
) -> None:
    """Prune at several ratios and plot perplexity against the ratio."""
    from prunekit.weights.job import SweepJob, SweepRecipe

    values = numbers(ratios, "--ratios")
    if sparsities is not None:
        values = deprecated("--sparsities", "--ratios", numbers(sparsities, "--sparsities"), values)
    options = {"model": model, "ratios": values, "blocks": blocks,
               **_data(calib, test, calib_samples, test_windows, seq_len, seed, None)}
    built = build_recipe(SweepRecipe, recipe, options,
                         {"method": (method, key_values(method_arg, "--method-arg")),
                          "allocation": (allocation, key_values(allocation_arg, "--allocation-arg"))})
    run_job(SweepJob(built), out, overwrite, threads)


@app.command("eval")
def evaluate_command(
    model: Optional[str] = MODEL_ARG,
    test: Optional[str] = typer.Option(None, "--test", help="test text: wiki or a .txt/.jsonl file [default: wiki]"),
    test_windows: Optional[int] = typer.Option(None, help="number of windows [default: 40]"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per window [default: 512]"),
    batch_size: Optional[int] = typer.Option(None, help="windows per forward pass [default: 4]"),
    text_field: Optional[str] = typer.Option(None, help="field holding the text in .jsonl files [default: text]"),
    blocks: Optional[str] = BLOCKS,
    tasks: Optional[str] = TASKS,
    task_examples: Optional[int] = TASK_EXAMPLES,
    task_seed: Optional[int] = TASK_SEED,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write report.json, report.md and recipe.yaml here"),
    recipe: Optional[Path] = RECIPE,
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Measure a model's perplexity (a pruned output directory, its compressed/ copy, or any causal LM), and with
    --tasks its zero-shot task accuracy."""
    from prunekit.weights.job import EvalJob, EvalRecipe

    options = {"model": model, "test": test, "test_windows": test_windows, "seq_len": seq_len,
               "batch_size": batch_size, "text_field": text_field, "blocks": blocks,
               **_tasks(tasks, task_examples, task_seed)}
    built = build_recipe(EvalRecipe, recipe, options)
    outcome = run_job(EvalJob(built), out, overwrite, threads, show=not as_json)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in outcome.report.items() if k != "environment"}, indent=2))

"""``prunekit shrink``: structural pruning that makes a model physically smaller, and ``prunekit shrink-graph``
to see what can be removed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.cli.options import BLOCKS, build_recipe, key_values, numbers, print_outcome, run_job
from prunekit.errors import PrunekitError


def _overrides(items: list[str] | None) -> dict[str, float] | None:
    result = {}
    for key, value in key_values(items, "--override", split_at_last=True).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunekitError(f"--override {key}={value}: the removed fraction must be a number")
        result[key] = float(value)
    return result or None


MODEL_ARG = typer.Argument(None, help="Hugging Face model directory (causal LM or BERT encoder); "
                                      "default: the embedded SmolLM2-135M")


@app.command()
def shrink(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the parameters (or MACs) to remove by width, in "
                                                     "[0, 1) [default: 0.2]"),
    target: Optional[str] = typer.Option(None, help="what the ratio counts: params or macs [default: params]"),
    method: Optional[str] = typer.Option(None, help="svd-llm (each linear factored in two, in the calibration-whitened "
                                                    "basis) or slicegpt (the residual stream rotated into its "
                                                    "principal axes and its weakest axes deleted) instead of "
                                                    "deleting units [default: delete units ranked by --importance]"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting KEY=VALUE, e.g. sequential=dense"),
    importance: Optional[str] = typer.Option(None, help="fisher, flap, wanda, taylor, l2, l1 or random [default: fisher for causal LMs, "
                                                             "flap for encoders]"),
    granularity: Optional[str] = typer.Option(None, help="comma-separated: channels (MLP neurons), heads, hidden "
                                                         "[default: channels,heads]"),
    heads: Optional[str] = typer.Option(None, help="grouped-query heads: kv (whole KV groups) or query (the same "
                                                   "number of query heads from every group) [default: kv]"),
    allocation: Optional[str] = typer.Option(None, help="global (one ranking across layers), uniform, or by "
                                             "measurement: knapsack or evolutionary (every family's width searched "
                                             "with the KL to the unpruned model) [default: global]"),
    allocation_arg: Optional[list[str]] = typer.Option(None, help="search setting KEY=VALUE of knapsack/"
                                                       "evolutionary, e.g. max_ratio=0.6, generations=10, "
                                                       "database=DIR (resumable); repeatable"),
    floor: Optional[float] = typer.Option(None, help="smallest fraction of any family's units kept [default: 0.1]"),
    round_to: Optional[int] = typer.Option(None, help="kept neurons/channels are a multiple of this [default: 8]"),
    normalize: Optional[str] = typer.Option(None, help="cross-layer score normalisation: kind, mean, max, sum, "
                                                       "standardize, none [default: kind for flap, none for fisher, else mean]"),
    override: Optional[list[str]] = typer.Option(None, help="PATTERN=FRACTION: fixed removed fraction for matching "
                                                            "families or modules; repeatable"),
    ignore: Optional[list[str]] = typer.Option(None, help="families or modules to leave whole (glob or re:regex); "
                                                          "repeatable"),
    reconstruct: Optional[bool] = typer.Option(None, "--reconstruct/--no-reconstruct", help="refit the layers reading "
                                               "removed neurons/heads by least squares on the calibration data "
                                               "[default: off]"),
    reconstruct_damping: Optional[float] = typer.Option(None, help="ridge of the refit towards the unpruned weights "
                                                        "(relative to the Gram matrix's mean diagonal) [default: "
                                                        "the library's, docs/structure.md]"),
    depth: Optional[int] = typer.Option(None, help="whole blocks to remove before width pruning [default: 0]"),
    depth_criterion: Optional[str] = typer.Option(None, help="influence (1 - cos of block input/output), perplexity "
                                                  "(each block skipped alone) or search (the blocks chosen together "
                                                  "by --depth-search, KL to the unpruned model)"),
    depth_search: Optional[str] = typer.Option(None, help="allocation of the search criterion: knapsack or "
                                               "evolutionary [default: evolutionary]"),
    recover: Optional[bool] = typer.Option(None, "--recover/--no-recover", help="fine-tune after shrinking [default: off]"),
    recover_seconds: Optional[float] = typer.Option(None, help="recovery time budget in seconds [default: 600]"),
    recover_steps: Optional[int] = typer.Option(None, help="recovery step budget"),
    recover_mode: Optional[str] = typer.Option(None, help="plain (the LM loss) or distill (from the unpruned model) [default: plain]"),
    recover_lr: Optional[float] = typer.Option(None, help="recovery learning rate [default: 3e-4]"),
    recover_train_only: Optional[list[str]] = typer.Option(None, help="train only parameters whose names contain "
                                                          "this fragment (e.g. mlp. and norm); repeatable "
                                                          "[default: all but the embedding]"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text: wiki, or a .txt/.jsonl file"),
    test: Optional[str] = typer.Option(None, "--test", help="test text: wiki or a file"),
    calib_samples: Optional[int] = typer.Option(None, help="calibration windows [default: 32]"),
    test_windows: Optional[int] = typer.Option(None, help="test windows [default: 40]"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per window [default: 512]"),
    seed: Optional[int] = typer.Option(None, help="seed of every random choice [default: 0]"),
    evaluate: Optional[bool] = typer.Option(None, "--eval/--no-eval", help="measure quality before and after [default: on]"),
    batch_sizes: Optional[str] = typer.Option(None, help="comma-separated batch sizes to time [default: 1,8]"),
    speed_seq_len: Optional[int] = typer.Option(None, help="tokens per sequence when timing [default: 128]"),
    runs: Optional[int] = typer.Option(None, help="timed runs per batch size (median) [default: 5]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for timing [default: 2]"),
    peak_memory: Optional[bool] = typer.Option(None, "--peak-memory/--no-peak-memory",
                                               help="measure each model's peak inference memory in a fresh process "
                                                    "[default: on]"),
    lenient: Optional[bool] = typer.Option(None, "--lenient/--strict", help="leave the channels around an operation "
                                           "the tracer does not know unpruned (and say so) instead of failing "
                                           "[default: strict]"),
    onnx: Optional[bool] = typer.Option(None, "--onnx/--no-onnx", help="also export model.onnx and check it with "
                                                                     "onnxruntime [default: off]"),
    blocks: Optional[str] = BLOCKS,
    trust_remote_code: bool = typer.Option(False, help="allow model code from the model directory"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Remove whole neurons, attention heads and blocks so the model gets smaller and faster; write it and a report."""
    from prunekit.structure.job import ShrinkJob
    from prunekit.structure.recipe import RecoveryConfig, ShrinkRecipe

    contract.check_threads(threads)  # the threads of the speed measurement, a recipe setting
    search = {f"allocation.search.{key}": value
              for key, value in key_values(allocation_arg, "--allocation-arg").items()}
    options = {"model": model, "blocks": blocks, "ratio": ratio, "target": target, "granularity": granularity, "heads": heads,
               "importance": importance, "overrides": _overrides(override), "ignore": ignore or None,
               "evaluate": evaluate, "onnx": onnx, "lenient": lenient, "reconstruct": reconstruct,
               "reconstruct_damping": reconstruct_damping, "trust_remote_code": trust_remote_code or None,
               "allocation.name": allocation, "allocation.floor": floor, "allocation.round_to": round_to,
               "allocation.normalize": normalize, "depth.blocks": depth, "depth.criterion": depth_criterion,
               "depth.search": depth_search, **search,
               "recovery.seconds": recover_seconds, "recovery.steps": recover_steps, "recovery.mode": recover_mode,
               "recovery.lr": recover_lr, "recovery.train_only": recover_train_only or None,
               "data.calibration": calib, "data.test": test, "data.calibration_samples": calib_samples,
               "data.test_windows": test_windows, "data.seq_len": seq_len, "data.seed": seed,
               "measure.batch_sizes": numbers(batch_sizes, "--batch-sizes", int), "measure.seq_len": speed_seq_len,
               "measure.runs": runs, "measure.threads": threads, "measure.memory": peak_memory}
    built = build_recipe(ShrinkRecipe, recipe, options, {"method": (method, key_values(method_arg, "--method-arg"))})
    # A recovery setting turns recovery on; --recover alone turns it on with its defaults, --no-recover off.
    if recover is False:
        built = built.model_copy(update={"recovery": None})
    elif recover and built.recovery is None:
        built = built.model_copy(update={"recovery": RecoveryConfig()})
    run_job(ShrinkJob(built), out, overwrite)


@app.command("shrink-graph")
def shrink_graph(
    model: Optional[str] = MODEL_ARG,
    heads: Optional[str] = typer.Option(None, help="how grouped-query heads form units: kv or query [default: kv]"),
    lenient: Optional[bool] = typer.Option(None, "--lenient/--strict", help="leave the channels around an operation "
                                           "the tracer does not know unpruned instead of failing [default: strict]"),
    blocks: Optional[str] = BLOCKS,
    trust_remote_code: bool = typer.Option(False, help="allow model code from the model directory"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write report.json, report.md and recipe.yaml "
                                                                 "here"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List what structural pruning can remove from a model: every family of coupled units."""
    import json

    from rich.console import Console
    from rich.table import Table

    from prunekit.structure.job import ShrinkGraphJob, graph_rows
    from prunekit.structure.recipe import ShrinkGraphRecipe

    options = {"model": model, "blocks": blocks, "heads": heads, "lenient": lenient, "trust_remote_code": trust_remote_code or None}
    built = build_recipe(ShrinkGraphRecipe, recipe, options)
    outcome = run_job(ShrinkGraphJob(built), out, overwrite, show=False)
    report = outcome.report
    if as_json:
        typer.echo(json.dumps({"families": report["families"], "notes": report["notes"],
                               "parameters": report["parameters"]}, indent=2))
        return
    table = Table(title=outcome.title)
    for column in ("family", "kind", "units", "exact", "one unit removes"):
        table.add_column(column)
    for row in graph_rows(report):
        table.add_row(*row)
    Console().print(table)
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    print_outcome(outcome)

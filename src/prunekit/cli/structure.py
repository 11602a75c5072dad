"""``prunekit shrink``: structural pruning that makes a model physically smaller, and ``prunekit shrink-graph``
to see what can be removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.errors import PrunekitError


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    import yaml

    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise PrunekitError(f"{what} '{item}' must look like PATTERN=VALUE")
        try:
            result[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PrunekitError(f"{what} '{item}': cannot read '{value}'") from None
    return result


def _overrides(items: list[str] | None) -> dict[str, float]:
    result = {}
    for key, value in _pairs(items, "--override").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunekitError(f"--override {key}={value}: the removed fraction must be a number")
        result[key] = float(value)
    return result


def build_recipe(recipe_file: Optional[Path], settings: dict[str, Any], sections: dict[str, dict[str, Any]]):
    from prunekit.structure.recipe import ShrinkRecipe

    base: dict[str, Any] = {}
    if recipe_file is not None:
        base = ShrinkRecipe.from_yaml(recipe_file).model_dump(mode="json", by_alias=True)
    for key, value in settings.items():
        if value is not None:
            base[key] = value
    for section, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if section == "recovery":
            enabled = values.pop("enabled", None)
            if enabled is False:
                base["recovery"] = None
                continue
            if not values and not enabled:
                continue
            current = base.get("recovery") or {}
        else:
            current = base.get(section) or {}
        if values or section not in base:
            base[section] = {**current, **values}
    return ShrinkRecipe.build(base, where="settings")


MODEL_ARG = typer.Argument(None, help="Hugging Face model directory (causal LM or BERT encoder); "
                                      "default: the embedded SmolLM2-135M")


@app.command()
def shrink(
    model: Optional[str] = MODEL_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the parameters (or MACs) to remove by width, in "
                                                     "[0, 1) [default: 0.2]"),
    target: Optional[str] = typer.Option(None, help="what the ratio counts: params or macs [default: params]"),
    importance: Optional[str] = typer.Option(None, help="fisher, flap, wanda, taylor, l2, l1 or random [default: fisher for causal LMs, "
                                                             "flap for encoders]"),
    granularity: Optional[str] = typer.Option(None, help="comma-separated: channels (MLP neurons), heads, hidden "
                                                         "[default: channels,heads]"),
    heads: Optional[str] = typer.Option(None, help="grouped-query heads: kv (whole KV groups) or query (the same "
                                                   "number of query heads from every group) [default: kv]"),
    allocation: Optional[str] = typer.Option(None, help="global (one ranking across layers) or uniform [default: global]"),
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
    depth_criterion: Optional[str] = typer.Option(None, help="influence (1 - cos of block input/output) or perplexity"),
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
    trust_remote_code: bool = typer.Option(False, help="allow model code from the model directory"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Remove whole neurons, attention heads and blocks so the model gets smaller and faster; write it and a report."""
    from prunekit.structure.job import run_shrink_job

    contract.check_threads(threads)
    sizes = None
    if batch_sizes is not None:
        try:
            sizes = [int(v) for v in batch_sizes.split(",") if v.strip()]
        except ValueError:
            raise PrunekitError(f"--batch-sizes must be comma-separated integers, got '{batch_sizes}'") from None
    settings = {"model": model, "ratio": ratio, "target": target, "granularity": granularity, "heads": heads,
                "importance": importance, "overrides": _overrides(override) or None, "ignore": ignore or None,
                "evaluate": evaluate, "onnx": onnx, "lenient": lenient,
                "reconstruct": reconstruct, "reconstruct_damping": reconstruct_damping,
                "trust_remote_code": trust_remote_code or None}
    sections = {
        "allocation": {"name": allocation, "floor": floor, "round_to": round_to, "normalize": normalize},
        "depth": {"blocks": depth, "criterion": depth_criterion},
        "recovery": {"enabled": recover, "seconds": recover_seconds, "steps": recover_steps, "mode": recover_mode,
                     "lr": recover_lr, "train_only": recover_train_only or None},
        "data": {"calibration": calib, "test": test, "calibration_samples": calib_samples, "test_windows": test_windows,
                 "seq_len": seq_len, "seed": seed},
        "measure": {"batch_sizes": sizes, "seq_len": speed_seq_len, "runs": runs, "threads": threads,
                    "memory": peak_memory},
    }
    built = build_recipe(recipe, settings, sections)
    outcome = run_shrink_job(built, out, overwrite)
    _print_summary(outcome.report, outcome.out_dir)


def _print_summary(report: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    speed = report["speed"]
    table = Table(title=f"prunekit shrink: {report['model']['name']}", show_header=False)
    parameters = report["parameters"]
    table.add_row("parameters", f"{parameters['before']:,} → {parameters['after']:,} "
                                f"({parameters['removed_fraction']:.1%} removed)")
    table.add_row("MACs (batch 1)", f"{speed['before']['macs']:,} → {speed['after']['macs']:,}")
    for batch, ratio in speed["ratios"]["speedup"].items():
        table.add_row(f"throughput, batch {batch}", f"{speed['before']['throughput'][batch]:.1f} → "
                                                    f"{speed['after']['throughput'][batch]:.1f} {speed['before']['unit']}/s "
                                                    f"({ratio:.2f}×)")
    quality = report["quality"]
    if quality["before"] is not None:
        text = f"{quality['before']:.4g} → {quality['after_pruning']:.4g}"
        if quality["after_recovery"] is not None:
            text += f" → {quality['after_recovery']:.4g} after recovery"
        table.add_row(quality["metric"], text)
    memory = report["memory"]["inference"]
    if memory["before"] and memory["after"] and "error" not in memory["before"] and "error" not in memory["after"]:
        table.add_row(f"peak inference memory, batch {memory['before']['batch']}",
                      f"{memory['before']['peak_rss_bytes'] / 2**20:,.0f} → {memory['after']['peak_rss_bytes'] / 2**20:,.0f} "
                      "MiB (fresh process each)")
    table.add_row("prune time", f"{report['timing']['prune_seconds']:.1f} s")
    table.add_row("from_pretrained", "yes" if report["saving"]["from_pretrained"] else
                  "no: prunekit.load rebuilds it (" + "; ".join(report["saving"]["reasons"]) + ")")
    if out_dir is not None:
        table.add_row("written", f"{out_dir} (report.md, report.json, recipe.yaml)")
    Console().print(table)


@app.command("shrink-graph")
def shrink_graph(
    model: Optional[str] = MODEL_ARG,
    heads: str = typer.Option("kv", help="how grouped-query heads form units: kv or query"),
    lenient: bool = typer.Option(False, "--lenient", help="leave the channels around an operation the tracer does "
                                                          "not know unpruned instead of failing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List what structural pruning can remove from a model: every family of coupled units."""
    import json

    import torch
    from rich.console import Console
    from rich.table import Table

    from prunekit.models.base import adapter_for
    from prunekit.structure.graph import build_graph
    from prunekit.models.loading import CAUSAL_LM, ENCODER, load_model
    from prunekit.structure.pipeline import lm_example_inputs

    loaded = load_model(model, kind=(CAUSAL_LM, ENCODER), tokenizer=False)
    example = lm_example_inputs() if loaded.kind == "causal-lm" else {"input_ids": torch.arange(1, 5)[None]}
    graph = build_graph(loaded.model, example, adapter=adapter_for(loaded.model), head_mode=heads, strict=not lenient)
    if as_json:
        typer.echo(json.dumps({"families": graph.summary(), "notes": graph.frozen,
                               "parameters": graph.parameter_count()}, indent=2))
        return
    table = Table(title=f"{loaded.name}: {len(graph.families)} prunable families, "
                        f"{graph.parameter_count():,} parameters")
    for column in ("family", "kind", "units", "exact", "one unit removes"):
        table.add_column(column)
    base = graph.parameter_count()
    for family in graph.families:
        cost = base - graph.parameter_count({family.name: 1})
        table.add_row(family.name, family.kind, f"{family.size} {family.unit}s", "yes" if family.exact else "no",
                      f"{cost:,} parameters")
    Console().print(table)
    for note in graph.frozen:
        typer.echo(f"note: {note}")

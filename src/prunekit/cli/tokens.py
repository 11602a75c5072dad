"""``prunekit tokens``: training-free token reduction (ToMe, EViT, Zero-TPrune, DivPrune, FastV, baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.core.progress import console
from prunekit.errors import PrunekitError

tokens_app = typer.Typer(help="Drop or merge tokens inside transformers (no retraining) and measure what it buys.",
                         no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")

# How each kind of model is measured: prunekit evaluates token reduction on one task per kind.
_TASKS = {"image-classifier": "image", "encoder": "embedding", "causal-lm": "prefill"}


def _check_fashion_mnist_shape(loaded) -> None:
    """Image classifiers are measured on Fashion-MNIST: 28×28 images, 1 channel, 10 classes."""
    config = getattr(loaded.model, "config", None)
    if config is None:
        return  # prunekit's own ViT, trained on Fashion-MNIST
    shape = (getattr(config, "image_size", None), getattr(config, "num_channels", None), config.num_labels)
    if shape != (28, 1, 10):
        raise PrunekitError(f"{loaded.name} takes {shape[0]}×{shape[0]} images with {shape[1]} channels and "
                            f"{shape[2]} classes; prunekit evaluates image classifiers on Fashion-MNIST (28×28, "
                            "1 channel, 10 classes)")


def _numbers(text: str, what: str, kind: type = float) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PrunekitError(f"{what} must be comma-separated {'integers' if kind is int else 'numbers'}, got '{text}'") from None
    if not values:
        raise PrunekitError(f"{what} is empty")
    return values


def _method_options(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` (or ``KEY=VALUE`` when one method is given); values read as YAML scalars."""
    import yaml

    options: dict[str, dict[str, Any]] = {method: {} for method in methods}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"--method-arg '{item}' must look like method.key=value")
        method, dot, setting = key.strip().rpartition(".")
        if not dot:
            if len(methods) != 1:
                raise PrunekitError(f"--method-arg '{item}': name the method (method.{key}=...) when several are given")
            method, setting = methods[0], key.strip()
        if method not in options:
            raise PrunekitError(f"--method-arg '{item}' names method '{method}', which is not among --methods")
        options[method][setting] = yaml.safe_load(value) if value.strip() else ""
    return options


@tokens_app.command("methods")
def list_methods() -> None:
    """List the token reduction methods and the model families they run on."""
    from rich.console import Console
    from rich.table import Table

    from prunekit.tokens import FAMILIES, METHODS

    table = Table(title="token reduction methods")
    for column in ("method", "what it does", "reads", "default layers", "families"):
        table.add_column(column)
    schedule = {"every": "every block", "quarters": "¼, ½, ¾ of the depth", "single": "block 2 (FastV's K)"}
    for name in METHODS.names():
        method = METHODS.get(name)
        families = [family for family in FAMILIES.names() if FAMILIES.get(family).can_run(method)]
        table.add_row(name, method.summary, ", ".join(sorted(method.needs)) or "nothing", schedule[method.stages],
                      ", ".join(families))
    Console().print(table)


@tokens_app.command("eval")
def evaluate_command(
    model: str = typer.Argument(..., help="fashion-vit, minilm, smollm2, a prunekit ViT directory, or a Hugging Face "
                                          "ViT / BERT-style / Llama-style model directory"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for report.json, report.md and the plot"),
    methods: str = typer.Option("tome", help="comma-separated methods (see `prunekit tokens methods`)"),
    rates: str = typer.Option("0.1,0.2,0.3", help="comma-separated rates: the fraction of the reducible tokens each "
                                                  "reducing layer removes"),
    layers: Optional[str] = typer.Option(None, help="comma-separated blocks that reduce [default: each method's own]"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting METHOD.KEY=VALUE, e.g. tome.r=4; repeatable"),
    batch_sizes: str = typer.Option("1,32", help="batch sizes to time"),
    warmup: int = typer.Option(3, min=0, help="untimed warm-up passes"),
    repeats: int = typer.Option(10, min=1, help="timed passes; the median is reported"),
    samples: Optional[int] = typer.Option(None, min=1, help="evaluation size: images (default all 10000), passages "
                                                            "(default 256) or prefill windows (default 16)"),
    prompt_tokens: int = typer.Option(384, min=2, help="prefill: prompt length"),
    continuation_tokens: int = typer.Option(128, min=2, help="prefill: continuation length"),
    seed: int = typer.Option(0, help="seed of the random method"),
    attn_implementation: Optional[str] = typer.Option(None, help="Hugging Face models: sdpa or eager [default: the "
                                                                 "library's choice]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Apply token reduction methods at several rates to a model; measure quality, throughput and FLOPs."""
    from prunekit.evaluate.report import write_json
    from prunekit.io.atomic import atomic_directory, check_output_dir, write_text
    from prunekit.tokens import find_family, get_method
    from prunekit.tokens.evaluation import (ImageClassification, ImageProtocol, PassageProtocol, Prefill,
                                            PrefillProtocol, SweepSettings, TextEmbedding, plot_sweep, run_sweep,
                                            sweep_markdown, sweep_table)
    from prunekit.models.loading import load_model
    from prunekit.tokens.patch import resolve_layers

    contract.check_threads(threads)
    method_names = [name.strip().lower() for name in methods.split(",") if name.strip()]
    if not method_names:
        raise PrunekitError("--methods is empty")
    rate_values = _numbers(rates, "--rates")
    sizes = _numbers(batch_sizes, "--batch-sizes", int)
    if any(size < 1 for size in sizes):
        raise PrunekitError("--batch-sizes must be positive")
    layer_values = _numbers(layers, "--layers", int) if layers is not None else None
    options = _method_options(method_arg, method_names)
    for name in method_names:  # every setting is checked before a model is loaded
        for rate in rate_values:
            get_method(name, rate, **options[name])
    if attn_implementation not in (None, "sdpa", "eager"):
        raise PrunekitError(f"--attn-implementation must be sdpa or eager, got '{attn_implementation}'")
    out_path = check_output_dir(out, overwrite, inputs=(model,))
    contract.apply_threads(threads)

    loaded = load_model(model, attn_implementation=attn_implementation)
    task_kind = _TASKS.get(loaded.kind)
    if task_kind is None:
        raise PrunekitError(f"{loaded.name} is a {loaded.kind}; token reduction evaluates image classifiers, "
                            "text encoders and causal language models")
    if task_kind == "image":
        _check_fashion_mnist_shape(loaded)
    family = find_family(loaded.model)
    for name in method_names:
        method = get_method(name, rate_values[0], **options[name])
        family.check(method)
        resolve_layers(method, layer_values, family.depth)
    if task_kind == "image":
        task = ImageClassification.fashion_mnist(ImageProtocol(limit=samples))
    elif task_kind == "embedding":
        task = TextEmbedding.wiki(loaded.require_tokenizer(), PassageProtocol(count=samples or 256))
    else:
        task = Prefill.wiki(loaded.require_tokenizer(), PrefillProtocol(prompt_tokens=prompt_tokens,
                                                              continuation_tokens=continuation_tokens,
                                                              windows=samples or 16))
    settings = SweepSettings(methods=method_names, rates=rate_values, batch_sizes=sizes, warmup=warmup,
                             repeats=repeats, layers=layer_values, seed=seed, options=options, threads=threads)
    result = run_sweep(loaded.model, task, settings)
    result["model"] = {"name": loaded.name, "family": family.name}
    title = f"Token reduction on {loaded.name}"
    with atomic_directory(out_path, overwrite=overwrite) as tmp:
        write_json(tmp / "report.json", result)
        write_text(tmp / "report.md", sweep_markdown(result, title)
                   + "\n![quality against measured throughput](quality_vs_throughput.png)\n")
        plot_sweep(result, tmp / "quality_vs_throughput.png", title)
    typer.echo(sweep_table(result))
    console.print(f"written: {out_path} (report.md, report.json, quality_vs_throughput.png)", highlight=False)

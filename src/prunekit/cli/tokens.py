"""``prunekit tokens``: training-free token reduction (ToMe, EViT, Zero-TPrune, DivPrune, FastV, baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.cli.options import BLOCKS, build_recipe, deprecated, grouped_key_values, numbers, run_job
from prunekit.errors import PrunekitError

tokens_app = typer.Typer(help="Drop or merge tokens inside transformers (no retraining) and measure what it buys.",
                         no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


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
    model: Optional[str] = typer.Argument(None, help="fashion-vit, minilm, smollm2, a prunekit ViT directory, or a "
                                                     "Hugging Face ViT / BERT-style / Llama-style model directory "
                                                     "[default: the recipe's]"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for report.json, report.md, recipe.yaml "
                                                      "and the plot"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods (see `prunekit tokens methods`) "
                                                     "[default: tome]"),
    ratios: Optional[str] = typer.Option(None, help="comma-separated ratios: the fraction of the reducible tokens "
                                                    "each reducing layer removes [default: 0.1,0.2,0.3]"),
    layers: Optional[str] = typer.Option(None, help="comma-separated blocks that reduce [default: each method's own]"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting METHOD.KEY=VALUE, e.g. tome.r=4; "
                                                              "repeatable"),
    batch_sizes: Optional[str] = typer.Option(None, help="batch sizes to time [default: 1,32]"),
    warmup: Optional[int] = typer.Option(None, min=0, help="untimed warm-up pairs [default: 3]"),
    repeats: Optional[int] = typer.Option(None, min=1, help="timed pairs; the median is reported [default: 10]"),
    samples: Optional[int] = typer.Option(None, min=1, help="evaluation size: images (default all 10000), passages "
                                                            "(default 256) or prefill windows (default 16)"),
    prompt_tokens: Optional[int] = typer.Option(None, min=2, help="prefill: prompt length [default: 384]"),
    continuation_tokens: Optional[int] = typer.Option(None, min=2, help="prefill: continuation length "
                                                                        "[default: 128]"),
    seed: Optional[int] = typer.Option(None, help="seed of the random method [default: 0]"),
    attn_implementation: Optional[str] = typer.Option(None, help="Hugging Face models: sdpa or eager [default: the "
                                                                 "library's choice]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    blocks: Optional[str] = BLOCKS,
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    rates: Optional[str] = typer.Option(None, hidden=True, help="deprecated: --ratios"),
) -> None:
    """Apply token reduction methods at several ratios to a model; measure quality, throughput and FLOPs."""
    from prunekit.tokens.job import TokensEvalJob
    from prunekit.tokens.recipe import TokensEvalRecipe

    contract.check_threads(threads)
    ratio_values = deprecated("--rates", "--ratios", numbers(rates, "--rates"), numbers(ratios, "--ratios"))
    names = None
    if methods is not None:
        names = [name.strip().lower() for name in methods.split(",") if name.strip()]
        if not names:
            raise PrunekitError("--methods is empty")
    options = {"model": model, "blocks": blocks, "ratios": ratio_values, "layers": numbers(layers, "--layers", int),
               "batch_sizes": numbers(batch_sizes, "--batch-sizes", int), "warmup": warmup, "repeats": repeats,
               "samples": samples, "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens,
               "seed": seed, "attn_implementation": attn_implementation}
    if recipe is None and model is None:
        raise PrunekitError("Missing argument 'MODEL' (or a --recipe that names it)")
    # The recipe is read once; the methods after the command line are validated with the ratios after it.
    base = TokensEvalRecipe.from_yaml(recipe).model_dump(mode="json") if recipe is not None else {}
    if names is not None or method_arg:
        options["methods"] = _methods(base.get("methods") or TokensEvalRecipe.model_fields["methods"].get_default(
            call_default_factory=True), names, method_arg)
    built = build_recipe(TokensEvalRecipe, None, {**base, **{k: v for k, v in options.items() if v is not None}})
    run_job(TokensEvalJob(built, threads), out, overwrite, threads)


def _methods(current: list[dict], names: list[str] | None, method_arg: list[str] | None) -> list[dict]:
    """The methods after ``--methods`` (which replaces them) and ``--method-arg`` (which sets them); a method
    already there keeps its settings."""
    by_name = {spec["name"]: spec for spec in current}
    chosen = names if names is not None else list(by_name)
    settings = grouped_key_values(method_arg, "--method-arg", chosen, example="tome.r=4")
    return [{**by_name.get(name, {"name": name}), **settings[name]} for name in chosen]

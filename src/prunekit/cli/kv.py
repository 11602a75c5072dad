"""``prunekit kv``: key/value-cache compression of causal language models (SnapKV, TOVA, Knorm, StreamingLLM,
Expected Attention, VATP, random) and its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.cli.options import build_recipe, grouped_key_values, numbers, run_job
from prunekit.errors import PrunekitError

kv_app = typer.Typer(help="Compress the key/value cache of a causal language model after its prompt and measure "
                          "what it costs and saves.", no_args_is_help=True)
app.add_typer(kv_app, name="kv")


@kv_app.command("methods")
def list_methods() -> None:
    """List the kv-cache compression methods."""
    from rich.console import Console
    from rich.table import Table

    from prunekit.kv import METHODS

    table = Table(title="kv-cache compression methods")
    for column in ("method", "ranks entries by", "settings (default)"):
        table.add_column(column)
    for name in METHODS.names():
        method = METHODS.get(name)
        settings = {key: field.default for key, field in method.model_fields.items() if key != "ratio"}
        table.add_row(name, method.summary, ", ".join(f"{k}={v}" for k, v in settings.items()) or "–")
    Console().print(table)


@kv_app.command("eval")
def evaluate_command(
    model: Optional[str] = typer.Argument(None, help="smollm2 or a Hugging Face causal language model directory "
                                                     "[default: the recipe's]"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for report.json, report.md, recipe.yaml "
                                                      "and the plot"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods (see `prunekit kv methods`) "
                                                     "[default: snapkv,knorm,streaming_llm,tova,expected_attention]"),
    ratios: Optional[str] = typer.Option(None, help="comma-separated fractions of the prompt's cached entries removed "
                                                    "[default: 0.25,0.5,0.75,0.9]"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting METHOD.KEY=VALUE, e.g. "
                                                              "snapkv.window_size=32; repeatable"),
    allocation: Optional[str] = typer.Option(None, help="budget over a block's key heads (uniform, adaptive: Ada-KV) "
                                                        "or over the blocks (pyramid: PyramidKV) [default: uniform]"),
    decode_budget: Optional[int] = typer.Option(None, help="entries per key head kept while decoding [default: no "
                                                           "budget]"),
    decode_every: Optional[int] = typer.Option(None, help="decoding steps between compressions [default: 16]"),
    zero_ratio: Optional[float] = typer.Option(None, help="fraction of every cached key and value vector zeroed, "
                                                        "smallest magnitudes first (Mustafar) [default: 0]"),
    question: Optional[str] = typer.Option(None, help="needle: aware (the question is compressed with the prompt) or "
                                                      "agnostic (it follows the compressed prompt) [default: aware]"),
    prompt_tokens: Optional[int] = typer.Option(None, min=64, help="compressed prefix length [default: 2048]"),
    continuation_tokens: Optional[int] = typer.Option(None, min=2, help="tokens scored after it [default: 256]"),
    windows: Optional[int] = typer.Option(None, min=1, help="wiki articles scored [default: 4]"),
    depths: Optional[str] = typer.Option(None, help="needle depths in [0, 1] [default: 0,0.25,0.5,0.75,1]"),
    decode_tokens: Optional[int] = typer.Option(None, min=2, help="greedy tokens timed [default: 32]"),
    warmup: Optional[int] = typer.Option(None, min=0, help="untimed warm-up pairs [default: 1]"),
    repeats: Optional[int] = typer.Option(None, min=1, help="timed pairs; medians are reported [default: 3]"),
    seed: Optional[int] = typer.Option(None, help="seed of the needles and the random method [default: 0]"),
    attn_implementation: Optional[str] = typer.Option(None, help="sdpa or eager [default: sdpa]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Compress the prompt's kv cache with several methods at several ratios; measure long-context perplexity,
    needle retrieval, cache bytes, peak memory and speed against the full cache."""
    from prunekit.kv.job import KVEvalJob
    from prunekit.kv.recipe import KVEvalRecipe

    contract.check_threads(threads)
    names = None
    if methods is not None:
        names = [name.strip().lower() for name in methods.split(",") if name.strip()]
        if not names:
            raise PrunekitError("--methods is empty")
    if recipe is None and model is None:
        raise PrunekitError("Missing argument 'MODEL' (or a --recipe that names it)")
    options = {"model": model, "ratios": numbers(ratios, "--ratios"), "allocation": allocation, "question": question,
               "decode_budget": decode_budget, "decode_every": decode_every, "zero_ratio": zero_ratio,
               "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens, "windows": windows,
               "depths": numbers(depths, "--depths"), "decode_tokens": decode_tokens, "warmup": warmup,
               "repeats": repeats, "seed": seed, "attn_implementation": attn_implementation}
    base = KVEvalRecipe.from_yaml(recipe).model_dump(mode="json") if recipe is not None else {}
    if names is not None or method_arg:
        current = base.get("methods") or KVEvalRecipe.model_fields["methods"].get_default(call_default_factory=True)
        by_name = {spec["name"]: spec for spec in current}
        chosen = names if names is not None else list(by_name)
        settings = grouped_key_values(method_arg, "--method-arg", chosen, example="snapkv.window_size=32")
        options["methods"] = [{**by_name.get(name, {"name": name}), **settings[name]} for name in chosen]
    built = build_recipe(KVEvalRecipe, None, {**base, **{k: v for k, v in options.items() if v is not None}})
    run_job(KVEvalJob(built, threads), out, overwrite, threads)

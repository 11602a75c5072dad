"""``prunekit export``: write a pruned or shrunk model for an inference engine (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunekit.cli.app import app
from prunekit.cli.options import build_recipe, run_job


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help="model directory (dense, pruned or shrunk Llama-family "
                                                     "decoder); default: the embedded SmolLM2-135M"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory: model.gguf, report and recipe.yaml (must "
                                                      "not exist, unless --overwrite)"),
    to: Optional[str] = typer.Option(None, help="format: gguf [default: gguf]"),
    type: Optional[str] = typer.Option(None, "--type", help="number type of the matrices: f32, f16 or q8_0 "
                                                            "[default: f32]"),
    pre_tokenizer: Optional[str] = typer.Option(None, help="llama.cpp's name of the tokenizer's pre-tokenisation "
                                                           "[default: read from tokenizer.json]"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Write a model as one GGUF file for llama.cpp, with the widths of every layer (a shrunk model too)."""
    from prunekit.models.export import ExportJob, ExportRecipe

    options = {"model": model, "to": to, "type": type, "pre_tokenizer": pre_tokenizer}
    run_job(ExportJob(build_recipe(ExportRecipe, recipe, options)), out, overwrite)

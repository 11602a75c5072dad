"""``prunekit train ...``: sparse training on Fashion-MNIST, recovery fine-tuning of a pruned LM, method list."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunekit.cli.app import app
from prunekit.cli.options import BLOCKS, build_recipe, deprecated, key_values, run_job

train_app = typer.Typer(help="Sparse training (GMP, lottery tickets, SNIP/GraSP/SynFlow, SET/RigL, ...) and "
                             "recovery fine-tuning that keeps a pruned model's mask.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("fashion-mnist")
def fashion_mnist(
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    method: Optional[str] = typer.Option(None, help="dense, gmp, channel_gmp, lottery, snip, grasp, synflow, random, "
                                                    "set, rigl, granet or magnitude (one-shot, then fine-tune) [default: rigl]"),
    model: Optional[str] = typer.Option(None, help="cnn or mlp [default: cnn]"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the weights removed by the end, in [0, 1) [default: 0.9]"),
    allocation: Optional[str] = typer.Option(None, help="uniform, er, erk, global or lamp [default: the method's own]"),
    allocation_arg: Optional[list[str]] = typer.Option(None, help="allocation setting, e.g. dense_first_layer=true"),
    epochs: Optional[int] = typer.Option(None, help="training epochs (per round for a lottery ticket) [default: 5]"),
    finetune_epochs: Optional[int] = typer.Option(None, help="magnitude: fine-tuning epochs after pruning [default: epochs/2]"),
    batch_size: Optional[int] = typer.Option(None, help="[default: 128]"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (cosine decay) [default: 0.05]"),
    optimizer: Optional[str] = typer.Option(None, help="sgd (Nesterov momentum) or adamw [default: sgd]"),
    seed: Optional[int] = typer.Option(None, help="fixes the initialisation, data order and every random mask [default: 0]"),
    train_limit: Optional[int] = typer.Option(None, help="train on the first N images only"),
    test_limit: Optional[int] = typer.Option(None, help="test on the first N test images only"),
    method_arg: Optional[list[str]] = typer.Option(None, help="method setting KEY=VALUE, e.g. per_round=0.2, "
                                                              "rewind_epoch=1, update_interval=50, drop_fraction=0.3"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]"),
    sparsity: Optional[float] = typer.Option(None, hidden=True, help="deprecated: --ratio"),
    distribution: Optional[str] = typer.Option(None, hidden=True, help="deprecated: --allocation"),
    distribution_arg: Optional[list[str]] = typer.Option(None, hidden=True, help="deprecated: --allocation-arg"),
) -> None:
    """Train a small CNN or MLP on Fashion-MNIST with a sparse-training method; write the model and a report."""
    from prunekit.training.vision_job import VisionTrainingJob, VisionTrainingRecipe

    ratio = deprecated("--sparsity", "--ratio", sparsity, ratio)
    allocation = deprecated("--distribution", "--allocation", distribution, allocation)
    allocation_args = {**key_values(distribution_arg, "--distribution-arg"),
                       **key_values(allocation_arg, "--allocation-arg")}
    options = {"model": model, "ratio": ratio, "epochs": epochs, "finetune_epochs": finetune_epochs,
               "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "seed": seed,
               "train_limit": train_limit, "test_limit": test_limit}
    built = build_recipe(VisionTrainingRecipe, recipe, options,
                         {"method": (method, key_values(method_arg, "--method-arg"), "method_args"),
                          "allocation": (allocation, allocation_args)})
    run_job(VisionTrainingJob(built), out, overwrite, threads)


@train_app.command("recover")
def recover(
    model: Optional[str] = typer.Argument(None, help="a pruned model directory (e.g. from prunekit prune), "
                                                     "or with --prune any model; default: SmolLM2-135M"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist, unless --overwrite)"),
    prune: Optional[str] = typer.Option(None, help="prune first with this one-shot method (wanda, sparsegpt, magnitude)"),
    ratio: Optional[float] = typer.Option(None, help="with --prune: fraction of the weights removed [default: 0.5]"),
    mode: Optional[str] = typer.Option(None, help="full (every parameter, mask kept) or lora (masked LoRA, merged) [default: full]"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps [default: 100]"),
    batch_size: Optional[int] = typer.Option(None, help="windows per step [default: 4]"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate [default: 2e-5 full, 2e-4 lora]"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank [default: 16]"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha [default: 32]"),
    train_windows: Optional[int] = typer.Option(None, help="calibration-split windows to train on [default: 256]"),
    train_seq_len: Optional[int] = typer.Option(None, help="tokens per training window [default: 256]"),
    test_windows: Optional[int] = typer.Option(None, help="perplexity test windows [default: 40]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    blocks: Optional[str] = BLOCKS,
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; options given here override it"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
    sparsity: Optional[float] = typer.Option(None, hidden=True, help="deprecated: --ratio"),
) -> None:
    """Fine-tune a one-shot-pruned language model on the calibration text, keeping every pruned weight at zero."""
    from prunekit.training.recovery import RecoveryJob, RecoveryRecipe

    ratio = deprecated("--sparsity", "--ratio", sparsity, ratio)
    options = {"model": model, "blocks": blocks, "prune": prune, "ratio": ratio, "mode": mode, "steps": steps,
               "batch_size": batch_size, "lr": lr, "rank": rank, "alpha": alpha, "train_windows": train_windows,
               "train_seq_len": train_seq_len, "seed": seed, "data.test_windows": test_windows}
    built = build_recipe(RecoveryRecipe, recipe, options)
    run_job(RecoveryJob(built), out, overwrite, threads)


@train_app.command("methods")
def methods() -> None:
    """List the sparse-training methods and layer-wise allocations."""
    from rich.console import Console
    from rich.table import Table

    from prunekit.core.allocation import ALLOCATIONS
    from prunekit.training.base import SPARSIFIERS

    table = Table(title="sparse-training methods")
    table.add_column("name")
    table.add_column("what")
    table.add_column("default allocation")
    for name in SPARSIFIERS.names():
        cls = SPARSIFIERS.get(name)
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()
        table.add_row(name, doc[0] if doc else "", cls.default_distribution)
    Console().print(table)
    typer.echo("allocations: " + ", ".join(n for n in ALLOCATIONS.names() if n != "owl"))

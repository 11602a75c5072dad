"""Sparse training of a small classifier on Fashion-MNIST: the job behind ``prunekit train fashion-mnist``
and the benchmark. One settings object (``VisionTrainingRecipe``) fixes every choice of a run.

The job never names a method. It tells the method about the run (``TrainingRun``: its length, one
image's shape) and the method derives the settings it leaves open (``settings_for``: GMP prunes
from 10 % to 75 % of the steps, RigL rewires until 75 %, ...); ``method_args`` override them.
Then it provides what the method needs: batches of the seeded training order ("data"), a dense
training before pruning and a fine-tuning after ("trained_model"), a loop that trains in rounds
("rounds", in ``train_sparse``). A method needing what this job cannot provide is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from prunekit.core.config import RecipeModel
from prunekit.core.job import Job, Outcome
from prunekit.core.patterns import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_parameters
from prunekit.evaluate.outcome import execute
from prunekit.evaluate.report import SPEED_NOTE, environment, markdown_table
from prunekit.models.fashion_mnist import MEAN, STD, ImageSet, load_fashion_mnist
from prunekit.models.vision import MLP, SmallCNN
from prunekit.training.base import Sparsifier
from prunekit.training.fit import SparseRun, steps_per_epoch, train_sparse
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod, TrainingRun
from prunekit.training.report import (
    densities,
    plot_sparsity_over_training,
    plot_training,
    sparse_flops,
)

DENSE = "dense"
# What this job gives a method: "loss" is the classifier's cross-entropy, the default of methods that need one.
PROVIDES = frozenset({"schedule", "gradients", "data", "loss", "input_shape", "rounds", "trained_model"})


class VisionTrainingRecipe(RecipeModel):
    """Every setting of one Fashion-MNIST run."""

    renamed: ClassVar[dict[str, str]] = {"sparsity": "ratio", "distribution": "allocation"}

    method: str = "rigl"
    model: Literal["cnn", "mlp"] = "cnn"
    width: int = Field(32, ge=1, description="CNN channels of the first conv block")
    hidden: list[int] = Field(default_factory=lambda: [300, 100], description="MLP hidden sizes")
    ratio: float = Field(0.9, description="fraction of the sparsified layers' weights removed by the end")
    allocation: str | dict[str, Any] | None = Field(None, description="how the ratio is spread over layers "
                                                                      "[default: the method's own]")
    epochs: int = Field(5, ge=1, description="epochs of training (per round for a method that trains in rounds)")
    finetune_epochs: int | None = Field(None, ge=1, description="methods that prune a trained model: epochs of "
                                                                "fine-tuning after pruning [default: epochs / 2]")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = 0
    train_limit: int | None = Field(None, ge=1, description="use only the first N training images")
    test_limit: int | None = Field(None, ge=1, description="use only the first N test images")
    method_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        value = value.lower()
        if value == DENSE:
            return value
        if value not in SPARSIFIERS:
            raise ValueError(f"unknown method '{value}'; choose dense or one of: {', '.join(SPARSIFIERS.names())}")
        refusal = SPARSIFIERS.get(value).refusal(PROVIDES, "training a fresh model on Fashion-MNIST")
        if refusal:
            raise ValueError(f"{refusal} (use it from Python)")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        try:
            return check_sparsity(value, "ratio")
        except PrunekitError as exc:
            raise ValueError(str(exc)) from None


def build_model(recipe: VisionTrainingRecipe) -> nn.Module:
    torch.manual_seed(recipe.seed)
    if recipe.model == "cnn":
        return SmallCNN(width=recipe.width)
    return MLP(hidden=tuple(recipe.hidden))


@dataclass
class VisionOutcome:
    recipe: VisionTrainingRecipe
    model: nn.Module
    sparsifier: Sparsifier | None
    run: SparseRun
    accuracy: float
    flops: dict
    dense_run: SparseRun | None = None
    extra: dict = field(default_factory=dict)


def load_data(recipe: VisionTrainingRecipe) -> tuple[ImageSet, ImageSet]:
    return load_fashion_mnist("train", recipe.train_limit), load_fashion_mnist("test", recipe.test_limit)


def _train_once(model: nn.Module, sparsifier: Sparsifier | None, recipe: VisionTrainingRecipe, train: ImageSet,
           test: ImageSet, epochs: int, description: str, every_epoch: bool = True) -> SparseRun:
    return train_sparse(model, sparsifier, train.images, train.labels, epochs, batch_size=recipe.batch_size,
                        lr=recipe.lr, optimizer=recipe.optimizer, momentum=recipe.momentum,
                        weight_decay=recipe.weight_decay, seed=recipe.seed, test=(test.images, test.labels),
                        evaluate_every_epoch=every_epoch, description=description)


def training_run(recipe: VisionTrainingRecipe, train: ImageSet) -> TrainingRun:
    per_epoch = steps_per_epoch(len(train), recipe.batch_size)
    return TrainingRun(total_steps=recipe.epochs * per_epoch, steps_per_epoch=per_epoch, epochs=recipe.epochs,
                       input_shape=tuple(train.images.shape[1:]))


def method_for_run(recipe: VisionTrainingRecipe, train: ImageSet) -> SparseTrainingMethod:
    """The recipe's method with every setting validated: the recipe's own, the rest derived from the run."""
    settings = SPARSIFIERS.get(recipe.method).settings_for(training_run(recipe, train), recipe.method_args)
    return SPARSIFIERS.build(recipe.method, **settings)


def seeded_batches(train: ImageSet, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one seeded shuffle of the training images, for methods that score weights on data."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield train.images[chosen], train.labels[chosen]


def create(method: SparseTrainingMethod, recipe: VisionTrainingRecipe, model: nn.Module, train: ImageSet) -> Sparsifier:
    """The method's sparsifier on ``model``, given what the method needs of this job."""
    provided: dict[str, Any] = {"seed": recipe.seed}
    if "data" in method.needs:
        provided["data"] = seeded_batches(train, recipe.batch_size, recipe.seed)
    return method.create(model, recipe.ratio, recipe.allocation, **provided)


def build_for_run(recipe: VisionTrainingRecipe, model: nn.Module, train: ImageSet) -> Sparsifier:
    return create(method_for_run(recipe, train), recipe, model, train)


def run_vision(recipe: VisionTrainingRecipe, data: tuple[ImageSet, ImageSet] | None = None,
               dense_state: dict[str, torch.Tensor] | None = None, evaluate_every_epoch: bool = True) -> VisionOutcome:
    """Train one model as the recipe says. ``dense_state`` (methods that prune a trained model only)
    skips the dense training by starting from those trained weights; without ``evaluate_every_epoch``
    the test set is measured only at the end (and at the end of each round of a method that has rounds)."""
    train, test = data or load_data(recipe)
    train_run = partial(_train_once, every_epoch=evaluate_every_epoch)
    model = build_model(recipe)
    dense_run = None
    if recipe.method == DENSE:
        sparsifier = None
        run = train_run(model, None, recipe, train, test, recipe.epochs, "Training (dense)")
    else:
        method = method_for_run(recipe, train)
        if "trained_model" in method.needs:
            # on a throwaway model first: what the method refuses, it refuses before the dense training
            create(method, recipe, build_model(recipe), train)
            if dense_state is None:
                dense_run = train_run(model, None, recipe, train, test, recipe.epochs, "Training (dense, before pruning)")
            else:
                model.load_state_dict(dense_state)
            sparsifier = create(method, recipe, model, train)
            epochs, description = recipe.finetune_epochs or max(recipe.epochs // 2, 1), "Fine-tuning (mask kept)"
        else:
            sparsifier = create(method, recipe, model, train)
            epochs, description = recipe.epochs, f"Training ({recipe.method})"
        run = train_run(model, sparsifier, recipe, train, test, epochs, description)
    example = train.images[:1]
    flops = sparse_flops(model, example, densities(sparsifier, model))
    assert run.final_accuracy is not None
    return VisionOutcome(recipe, model, sparsifier, run, run.final_accuracy, flops, dense_run)


def vision_report(outcome: VisionOutcome, train_size: int, test_size: int) -> dict:
    recipe, sparsifier = outcome.recipe, outcome.sparsifier
    layer_rows = []
    for name, info in outcome.flops["layers"].items():
        layer_rows.append({"name": name, "sparsity": 1 - info["density"], "dense_flops": info["dense"],
                           "sparse_flops": info["sparse"]})
    return {
        "method": sparsifier.describe() if sparsifier else {"name": DENSE},
        "model": {"kind": recipe.model, "parameters": count_parameters(outcome.model)},
        "sparsity": {"target": recipe.ratio if sparsifier else 0.0,
                     "achieved": sparsifier.sparsity if sparsifier else 0.0},
        "test_accuracy": outcome.accuracy,
        "flops": outcome.flops,
        "layers": layer_rows,
        "training": outcome.run.to_dict(),
        "dense_pretraining": outcome.dense_run.to_dict() if outcome.dense_run else None,
        "sparsity_history": sparsifier.history if sparsifier else [],
        "protocol": {"data": "Fashion-MNIST (Debian dataset-fashion-mnist)",
                     "train_images": train_size, "test_images": test_size,
                     "normalisation": f"(x/255 - {MEAN}) / {STD}",
                     "order": f"seeded shuffle per epoch (seed {recipe.seed}); accuracy on the whole test split given"},
        "speed_note": SPEED_NOTE,
        "recipe": recipe.model_dump(mode="json"),
        "environment": environment(),
    }


def vision_markdown(report: dict) -> str:
    method = report["method"]
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("name", "layers", "sparsity"))
    flops = report["flops"]
    rows = [
        ("method", method["name"] + (f" ({settings})" if settings else "")),
        ("model", f"{report['model']['kind']} ({report['model']['parameters']:,} parameters)"),
        ("target sparsity", f"{report['sparsity']['target']:.2%}"),
        ("achieved sparsity (sparsified layers)", f"{report['sparsity']['achieved']:.2%}"),
        ("test accuracy", f"{report['test_accuracy']:.2%}"),
        ("forward FLOPs per image, dense", f"{flops['dense']:,}"),
        ("forward FLOPs per image, sparse (theoretical)", f"{flops['sparse']:,.0f} ({flops['ratio']:.1%} of dense)"),
        ("optimizer steps", report["training"]["steps"]),
        ("training wall time", f"{report['training']['seconds']:.1f} s"),
    ]
    epochs = report["training"]["epochs"]
    lines = [f"# prunekit sparse training: {method['name']} on Fashion-MNIST", "", markdown_table(["", ""], rows), "",
             "## Per-layer sparsity and FLOPs", "",
             markdown_table(["layer", "sparsity", "dense FLOPs", "sparse FLOPs"],
                            [(l["name"], f"{l['sparsity']:.4f}", f"{l['dense_flops']:,}", f"{l['sparse_flops']:,.0f}")
                             for l in report["layers"]]), "",
             "## Training", "",
             markdown_table(["epoch", "round", "loss", "sparsity", "test accuracy"],
                            [(i + 1, e.get("round", 0), e.get("loss"), f"{e['sparsity']:.4f}",
                              f"{e['test_accuracy']:.4f}" if e.get("test_accuracy") is not None else None)
                             for i, e in enumerate(epochs)]), ""]
    if report["training"]["rounds"]:
        lines += ["## Pruning rounds", "",
                  markdown_table(["round", "sparsity", "test accuracy"],
                                 [(r["round"], f"{r['sparsity']:.4f}", f"{r['test_accuracy']:.4f}")
                                  for r in report["training"]["rounds"]]), ""]
    protocol = report["protocol"]
    lines += ["## Protocol", "", f"- data: {protocol['data']}; {protocol['train_images']} training and "
              f"{protocol['test_images']} test images; normalised {protocol['normalisation']}",
              f"- {protocol['order']}", f"- FLOPs: {flops['note']}", "", "## Speed", "", report["speed_note"], "",
              f"Environment: {json.dumps(report['environment'])}", ""]
    return "\n".join(lines)


class VisionTrainingJob(Job[VisionTrainingRecipe]):
    """``prunekit train fashion-mnist``: train, then write the model (masks baked in), its report and plots."""

    command = "train fashion-mnist"
    recipe_type = VisionTrainingRecipe
    reads_model = False  # the recipe's model names the architecture it trains

    def run(self) -> Outcome:
        recipe = self.recipe
        data = load_data(recipe)
        started = time.perf_counter()
        self.result = run_vision(recipe, data)
        report = vision_report(self.result, len(data[0]), len(data[1]))
        report["wall_seconds"] = time.perf_counter() - started
        summary = [("method", report["method"]["name"]),
                   ("sparsity", f"target {report['sparsity']['target']:.2%}, achieved {report['sparsity']['achieved']:.2%}"),
                   ("test accuracy", f"{report['test_accuracy']:.2%}"),
                   ("FLOPs per image", f"{report['flops']['sparse']:,.0f} of {report['flops']['dense']:,} dense "
                                       "(theoretical)"),
                   ("training", f"{report['training']['steps']} steps, {report['training']['seconds']:.1f} s")]
        return Outcome(report, vision_markdown(report), summary, f"prunekit: {recipe.method} on Fashion-MNIST")

    def write(self, directory: Path, outcome: Outcome) -> None:
        from prunekit.io.checkpoint import write_dense

        result, recipe = self.result, self.recipe
        if result.sparsifier is not None:
            plot_sparsity_over_training(result.sparsifier.history, directory / "sparsity_over_training.png",
                                        f"{recipe.method}: per-layer sparsity", total_steps=result.run.steps)
            result.sparsifier.squash()
        write_dense(result.model, directory)
        plot_training(result.run.epochs, directory / "training.png", f"{recipe.method} on Fashion-MNIST ({recipe.model})")


def run_vision_job(recipe: VisionTrainingRecipe, out: str | Path, overwrite: bool = False) -> tuple[dict, str]:
    """Train, then write the model (masks baked in), its report and plots to ``out`` atomically."""
    outcome = execute(VisionTrainingJob(recipe), out, overwrite)
    return outcome.report, outcome.markdown

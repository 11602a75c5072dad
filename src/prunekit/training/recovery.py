"""Recovery fine-tuning of a one-shot-pruned causal language model, keeping its mask exactly.

Two ways: ``full`` trains every parameter with the pruned positions held at zero by a
``FixedMask`` sparsifier; ``lora`` freezes the model and trains a masked LoRA on the pruned layers
(``training.lora``), merged at the end with the zeros intact. Training text is the protocol's
calibration split (random windows, seeded); perplexity is measured on its test split, so the two
never overlap. ``run_recovery_job`` is ``prunekit train recover``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import RecipeModel, TextDataConfig
from prunekit.core.progress import progress_bar, status
from prunekit.errors import PrunekitError
from prunekit.training.lora import attach_masked_lora, merge_lora
from prunekit.training.methods.fixed import FixedMask


@dataclass
class RecoveryResult:
    mode: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_parameters: int = 0
    tokens: int = 0
    layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "steps": self.steps, "losses": self.losses, "seconds": self.seconds,
                "trainable_parameters": self.trainable_parameters, "tokens": self.tokens,
                "layers": len(self.layers)}


def pruned_layers(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The decoder blocks' linear layers (as one-shot pruning targets them) that hold pruned weights."""
    from prunekit.models.base import adapter_for
    from prunekit.weights.pipeline import select_targets

    targets = select_targets(model, adapter_for(model), include, exclude)
    layers = {t.name: t.module for t in targets if bool((t.module.weight == 0).any())}
    if not layers:
        raise PrunekitError("the model has no pruned weights in its decoder layers; prune it first "
                            "(prunekit prune, or pass --prune wanda)")
    return layers


def zero_masks(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach() == 0 for name, module in layers.items()}


def recover(model: nn.Module, windows: torch.Tensor, mode: Literal["full", "lora"] = "full", steps: int = 100,
            batch_size: int = 4, lr: float | None = None, weight_decay: float = 0.0, warmup: float = 0.1,
            rank: int = 16, alpha: float = 32.0, seed: int = 0, layers: dict[str, nn.Module] | None = None,
            description: str | None = None) -> RecoveryResult:
    """Fine-tune ``model`` on token ``windows`` (samples × length) for ``steps`` AdamW steps.

    Learning rate: linear warm-up over ``warmup`` of the steps, then cosine decay to 0 (defaults:
    2e-5 full, 2e-4 LoRA). Returns the per-step training loss. The model is left plain (masks
    squashed, LoRA merged), with exactly the zeros it had before.
    """
    from transformers import get_cosine_schedule_with_warmup

    if mode not in ("full", "lora"):
        raise PrunekitError(f"recovery mode must be full or lora, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrunekitError(f"recovery steps must be a positive whole number, got {steps!r}")
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise PrunekitError("training windows must be a (samples, length) tensor of token ids")
    lr = lr if lr is not None else (2e-5 if mode == "full" else 2e-4)
    layers = layers if layers is not None else pruned_layers(model)
    result = RecoveryResult(mode=mode, steps=steps, layers=list(layers))
    torch.manual_seed(seed)
    sparsifier = None
    if mode == "full":
        sparsifier = FixedMask(model, include=[_exact(name) for name in layers])
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = attach_masked_lora(model, layers, rank=rank, alpha=alpha, seed=seed)
    unique = {id(p): p for p in params}
    result.trainable_parameters = sum(p.numel() for p in unique.values())
    optimizer = torch.optim.AdamW(list(unique.values()), lr=lr, weight_decay=weight_decay)
    if sparsifier is not None:
        sparsifier.attach_optimizer(optimizer)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(warmup * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    order = torch.randperm(windows.shape[0], generator=generator)
    cursor = 0
    model.train()
    started = time.perf_counter()
    try:
        with progress_bar(description or f"Recovery fine-tuning ({mode})", steps) as bar:
            for _ in range(steps):
                if cursor + batch_size > order.numel():
                    order, cursor = torch.randperm(windows.shape[0], generator=generator), 0
                batch = windows[order[cursor:cursor + batch_size]].to(device)
                cursor += batch_size
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not math.isfinite(float(loss.detach())):
                    raise PrunekitError("the training loss became NaN or inf; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if sparsifier is not None:
                    sparsifier.step()
                result.losses.append(float(loss.detach()))
                result.tokens += batch.numel()
                bar.advance()
    finally:
        model.eval()
        if sparsifier is not None:
            sparsifier.squash()
        else:
            merge_lora(model)
            for parameter in model.parameters():
                parameter.requires_grad_(True)
    result.seconds = time.perf_counter() - started
    return result


def _exact(name: str) -> str:
    """A layer name as an include pattern that matches only itself."""
    import re

    return "re:^" + re.escape(name) + "$"


class RecoveryRecipe(RecipeModel):
    """Every setting of ``prunekit train recover``."""

    model: str | None = None
    prune: str | None = Field(None, description="one-shot method to prune with first (wanda, sparsegpt, magnitude)")
    sparsity: float = Field(0.5, ge=0, lt=1)
    mode: Literal["full", "lora"] = "full"
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    seed: int = 0
    train_windows: int = Field(256, ge=1, description="calibration-split windows to fine-tune on")
    train_seq_len: int = Field(256, ge=2)
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    evaluate_dense: bool = Field(True, description="with --prune: also measure the model before pruning")

    @model_validator(mode="after")
    def _check(self) -> "RecoveryRecipe":
        if self.prune is not None:
            from prunekit.weights.base import METHODS

            if self.prune.lower() not in METHODS:
                raise ValueError(f"unknown pruning method '{self.prune}'; choose one of: {', '.join(METHODS.names())}")
        return self


def run_recovery(recipe: RecoveryRecipe, loaded=None) -> dict:
    """Prune (optionally), measure, fine-tune keeping the mask, measure again. Returns the report."""
    from prunekit.core.text import TextProtocol, calibration_windows, test_windows
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.evaluate.report import environment
    from prunekit.models.loading import CAUSAL_LM, load_model
    from prunekit.weights.pipeline import prune_weights

    loaded = loaded or load_model(recipe.model, kind=CAUSAL_LM)
    loaded.require_tokenizer()
    if recipe.prune is None:
        pruned_layers(loaded.model)  # a dense model is refused before any slow step
    protocol = recipe.data.protocol()
    test = test_windows(loaded.tokenizer, protocol)
    report: dict[str, Any] = {"model": loaded.name, "protocol": protocol.describe(), "recipe": recipe.model_dump(mode="json")}
    perplexities: dict[str, float | None] = {"dense": None}
    if recipe.prune is not None:
        if recipe.evaluate_dense:
            perplexities["dense"] = perplexity(loaded.model, test, 4, "Perplexity (dense)").perplexity
        calibration = calibration_windows(loaded.tokenizer, protocol)
        started = time.perf_counter()
        pruned = prune_weights(loaded.model, recipe.prune, recipe.sparsity, calibration=calibration)
        report["pruning"] = {"method": recipe.prune, "sparsity": recipe.sparsity,
                             "achieved": pruned.achieved_sparsity, "seconds": time.perf_counter() - started}
    layers = pruned_layers(loaded.model)
    before_masks = zero_masks(layers)
    perplexities["pruned"] = perplexity(loaded.model, test, 4, "Perplexity (pruned)").perplexity
    train_protocol = TextProtocol(calibration=protocol.calibration, calibration_samples=recipe.train_windows,
                                  seq_len=recipe.train_seq_len, seed=recipe.seed + 1, split=protocol.split,
                                  text_field=protocol.text_field)
    windows = calibration_windows(loaded.tokenizer, train_protocol)
    result = recover(loaded.model, windows, recipe.mode, recipe.steps, recipe.batch_size, recipe.lr,
                     recipe.weight_decay, recipe.warmup, recipe.rank, recipe.alpha, recipe.seed, layers)
    after_masks = zero_masks(layers)
    revived = sum(int((before & ~after_masks[name]).sum()) for name, before in before_masks.items())
    if revived:
        raise RuntimeError(f"recovery revived {revived} pruned weights; this is a prunekit bug")
    perplexities["recovered"] = perplexity(loaded.model, test, 4, "Perplexity (recovered)").perplexity
    zeros = sum(int(mask.sum()) for mask in after_masks.values())
    total = sum(mask.numel() for mask in after_masks.values())
    report.update({
        "perplexity": perplexities,
        "recovery": result.to_dict(),
        "training_text": train_protocol.describe()["calibration_windows"] + f" from {train_protocol.describe()['calibration_split']}",
        "sparsity": {"pruned_layers": len(layers), "sparsity_in_pruned_layers": zeros / max(total, 1),
                     "revived_weights": revived},
        "environment": environment(),
    })
    return report


def recovery_markdown(report: dict) -> str:
    from prunekit.evaluate.report import markdown_table

    ppl, rec = report["perplexity"], report["recovery"]
    rows = [("model", report["model"])]
    if "pruning" in report:
        rows.append(("one-shot pruning", f"{report['pruning']['method']} {report['pruning']['sparsity']:.0%} "
                                         f"(achieved {report['pruning']['achieved']:.2%})"))
    rows += [("recovery", f"{rec['mode']}: {rec['steps']} steps, {rec['tokens']:,} tokens, "
                          f"{rec['trainable_parameters']:,} trainable parameters, {rec['seconds']:.0f} s"),
             ("perplexity, dense", ppl["dense"]), ("perplexity, pruned", ppl["pruned"]),
             ("perplexity, recovered", ppl["recovered"]),
             ("sparsity of the pruned layers", f"{report['sparsity']['sparsity_in_pruned_layers']:.2%} "
                                               f"(revived weights: {report['sparsity']['revived_weights']})"),
             ("training text", report["training_text"]),
             ("test text", report["protocol"]["test_split"] + "; " + report["protocol"]["test_protocol"])]
    return "\n".join([f"# prunekit recovery fine-tuning: {report['model']}", "", markdown_table(["", ""], rows), "",
                      f"Training loss: first {rec['losses'][0]:.3f}, last {rec['losses'][-1]:.3f}.", "",
                      f"Environment: {json.dumps(report['environment'])}", ""])


def run_recovery_job(recipe: RecoveryRecipe, out: str | Path, overwrite: bool = False) -> tuple[dict, str]:
    from prunekit.evaluate.report import write_json
    from prunekit.io.atomic import atomic_directory, check_output_dir
    from prunekit.io.checkpoint import write_dense
    from prunekit.models.loading import CAUSAL_LM, load_model

    out_path = check_output_dir(out, overwrite, inputs=(recipe.model,))
    loaded = load_model(recipe.model, kind=CAUSAL_LM)
    report = run_recovery(recipe, loaded)
    markdown = recovery_markdown(report)
    with atomic_directory(out_path, overwrite) as tmp:
        with status("Saving the recovered model (loads with from_pretrained)"):
            write_dense(loaded.model, tmp, loaded.tokenizer)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
    return report, markdown

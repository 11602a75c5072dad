"""Recovery fine-tuning: one short fine-tune after pruning, for every dimension that needs one.

``recover`` fine-tunes a causal language model on token windows (calibration text, never the test
text) with AdamW, a linear warm-up and a cosine decay over the budget (steps, seconds, whichever
ends first), so a run stops on time with its learning rate already low. A ``FineTunePlan``, built
once from a recipe, says how:

- the objective: ``plain`` (the language-model loss) or ``distill`` (the KL divergence to an
  unpruned teacher's next-token distribution at temperature T, scaled by T²);
- the update: ``full`` (every trainable parameter) or ``lora`` (a masked LoRA on the pruned layers,
  merged at the end);
- ``keep_zeros``: hold the pruned weights of a one-shot-pruned model at exactly zero (a ``FixedMask``
  sparsifier for ``full``; the masked LoRA keeps them by construction).

``prunekit shrink --recover`` runs it on a physically smaller model (the (tied) embedding frozen:
its gradient costs as much as the output layer's forward and it was not pruned); ``prunekit train
recover`` on a one-shot-pruned one, keeping its zeros. Classifiers use ``recover_classifier`` on the
shared classifier training loop. Both return a ``RecoveryResult``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import RecipeModel, TextDataConfig, blocks_field
from prunekit.core.job import Job, Outcome
from prunekit.core.progress import progress_bar, status
from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import unique_parameters
from prunekit.training.lora import attach_masked_lora, merge_lora
from prunekit.training.methods.fixed import FixedMask

Objective = Literal["plain", "distill"]
Update = Literal["full", "lora"]
OBJECTIVES, UPDATES = ("plain", "distill"), ("full", "lora")


@dataclass
class RecoveryResult:
    """What a recovery fine-tune did, for every dimension alike."""

    objective: str
    update: str
    steps: int
    seconds: float
    samples: int
    tokens: int
    lr: float
    trainable_parameters: int = 0
    layers: int = 0  # layers whose pruned zeros were kept (or that took a LoRA)
    losses: list[float] = field(default_factory=list)  # the training loss of every step (every epoch: classifiers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FineTunePlan:
    """Every setting of one recovery fine-tune, checked when it is made."""

    objective: Objective = "plain"
    update: Update = "full"
    keep_zeros: bool = False
    steps: int | None = None
    seconds: float | None = None
    lr: float = 3e-4
    batch_size: int = 1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    train_embeddings: bool = False
    train_only: tuple[str, ...] = ()
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PrunekitError(f"unknown recovery objective '{self.objective}'; choose plain or distill")
        if self.update not in UPDATES:
            raise PrunekitError(f"unknown recovery update '{self.update}'; choose full or lora")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise PrunekitError(f"the recovery steps must be a positive whole number, got {self.steps!r}")
        if self.seconds is not None and self.seconds <= 0:
            raise PrunekitError(f"the recovery time budget must be positive, got {self.seconds}")
        if not self.steps and not self.seconds:
            raise PrunekitError("give the recovery a budget: a number of steps, seconds, or both")
        for name in ("lr", "batch_size", "temperature", "alpha", "rank"):
            if not getattr(self, name) > 0:
                raise PrunekitError(f"the recovery {name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise PrunekitError("the recovery warm-up and weight decay cannot be negative")
        object.__setattr__(self, "train_only", tuple(self.train_only))

    @classmethod
    def of(cls, plan: "FineTunePlan | None", settings: dict[str, Any]) -> "FineTunePlan":
        """``plan`` with ``settings`` replacing its values (a plan of the settings alone without one)."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PrunekitError(f"unknown recovery setting '{unknown[0]}'")
        if plan is None:
            return cls(**settings)
        return dataclasses.replace(plan, **settings) if settings else plan

    def learning_rate(self, step: int, progress: float) -> float:
        """The one schedule: linear warm-up over ``warmup_steps``, then cosine decay over the budget's progress."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


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


def _exact(name: str) -> str:
    """A layer name as an include pattern that matches only itself."""
    return "re:^" + re.escape(name) + "$"


def _frozen(model: nn.Module, plan: FineTunePlan) -> set[int]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    frozen = {id(embeddings.weight)} if (embeddings is not None and not plan.train_embeddings) else set()
    if plan.train_only:
        frozen |= {id(p) for name, p in model.named_parameters() if not any(part in name for part in plan.train_only)}
    return frozen


def _trainable(model: nn.Module, plan: FineTunePlan, layers: dict[str, nn.Module] | None):
    """The parameters to train, and the sparsifier holding the pruned zeros (full updates that keep them)."""
    if plan.update == "lora":
        return attach_masked_lora(model, layers, rank=plan.rank, alpha=plan.alpha, seed=plan.seed), None
    sparsifier = FixedMask(model, include=[_exact(name) for name in layers]) if layers else None
    frozen = _frozen(model, plan)
    parameters = list({id(p): p for p in model.parameters() if id(p) not in frozen}.values())
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return parameters, sparsifier


def recover(model: nn.Module, windows: torch.Tensor, plan: FineTunePlan | None = None, *,
            teacher: nn.Module | None = None, layers: dict[str, nn.Module] | None = None,
            description: str = "Recovery fine-tune", **settings: Any) -> RecoveryResult:
    """Fine-tune ``model`` on token ``windows`` (samples × length) as ``plan`` says (settings given by
    keyword replace the plan's); ``teacher`` is the unpruned model for distillation.

    No step starts that would, at the mean step time so far, end past the time budget. With
    ``keep_zeros`` or a LoRA update, ``layers`` (default: every decoder linear layer holding zeros) keep
    exactly the zeros they had. The model is left plain (masks squashed, LoRA merged), in eval mode,
    with the ``requires_grad`` flags it had.
    """
    plan = FineTunePlan.of(plan, settings)
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise PrunekitError("training windows must be a (samples, length) tensor of token ids")
    if plan.objective == "distill" and teacher is None:
        raise PrunekitError("distillation needs the unpruned teacher model")
    if plan.keep_zeros or plan.update == "lora":
        layers = layers if layers is not None else pruned_layers(model)
    else:
        layers = None
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(plan.seed)
    parameters, sparsifier = [], None
    try:
        parameters, sparsifier = _trainable(model, plan, layers)
        if not parameters:
            raise PrunekitError(f"no parameter left to train (train_only={list(plan.train_only)})")
        result = _train(model, windows, plan, teacher, parameters, sparsifier, description)
    finally:
        if sparsifier is not None:
            sparsifier.squash()
        if plan.update == "lora":
            merge_lora(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous.get(name, True))
        model.eval()
    result.trainable_parameters = sum(p.numel() for p in parameters)
    result.layers = len(layers or {})
    return result


def _train(model: nn.Module, windows: torch.Tensor, plan: FineTunePlan, teacher: nn.Module | None,
           parameters: list[nn.Parameter], sparsifier: FixedMask | None, description: str) -> RecoveryResult:
    optimizer = torch.optim.AdamW(parameters, lr=plan.lr, weight_decay=plan.weight_decay)
    if sparsifier is not None:
        sparsifier.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(plan.seed)
    device = next(model.parameters()).device
    order, cursor = torch.randperm(windows.shape[0], generator=generator), 0
    if teacher is not None:
        teacher.eval()
    model.train()
    result = RecoveryResult(plan.objective, plan.update, 0, 0.0, 0, 0, plan.lr)
    started = time.perf_counter()
    try:
        with progress_bar(description, plan.steps) as bar:
            while True:
                elapsed = time.perf_counter() - started
                steps = result.steps
                # The time budget is a ceiling: no step starts that the mean step so far says would overrun it.
                overrun = bool(plan.seconds) and steps > 0 and elapsed + elapsed / steps > plan.seconds
                if (plan.seconds and elapsed >= plan.seconds) or overrun or (plan.steps and steps >= plan.steps):
                    break
                progress = max(elapsed / plan.seconds if plan.seconds else 0.0,
                               steps / plan.steps if plan.steps else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = plan.learning_rate(steps, progress)
                if cursor + plan.batch_size > order.numel() and cursor > 0:  # each window once per pass
                    order, cursor = torch.randperm(windows.shape[0], generator=generator), 0
                batch = windows[order[cursor:cursor + plan.batch_size]].to(device)
                cursor += plan.batch_size
                loss = _loss(model, batch, plan, teacher)
                if not math.isfinite(float(loss.detach())):
                    raise PrunekitError(f"the recovery loss became {float(loss.detach())} at step {steps}; lower the "
                                        "learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if plan.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, plan.max_grad_norm)
                optimizer.step()
                if sparsifier is not None:
                    sparsifier.step()
                result.steps += 1
                result.samples += batch.shape[0]
                result.tokens += batch.numel()
                result.losses.append(float(loss.detach()))
                bar.advance()
    finally:
        optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - started
    return result


def _loss(model: nn.Module, batch: torch.Tensor, plan: FineTunePlan, teacher: nn.Module | None) -> torch.Tensor:
    if plan.objective == "plain":
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    logits = model(input_ids=batch, use_cache=False).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch, use_cache=False).logits
    return distillation_loss(logits[:, :-1], teacher_logits[:, :-1], plan.temperature)


def recover_classifier(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None = None,
                       objective: Objective = "plain", epochs: int = 1, lr: float = 0.01, batch_size: int = 128,
                       temperature: float = 4.0, alpha: float = 0.5, seed: int = 0) -> RecoveryResult:
    """Fine-tune a classifier with the shared classifier training loop (its seeded shuffle and cosine schedule):
    plain cross-entropy, or knowledge distillation, alpha·KL(teacher‖student)·T² + (1 − alpha)·CE."""
    from prunekit.training.loop import train_classifier

    if objective not in OBJECTIVES:
        raise PrunekitError(f"unknown recovery objective '{objective}'; choose plain or distill")
    started = time.perf_counter()
    if objective == "plain":
        history = train_classifier(student, inputs, labels, epochs=epochs, batch_size=batch_size, lr=lr,
                                   seed=seed, description="Recovery fine-tune")
    else:
        if teacher is None:
            raise PrunekitError("distillation needs the unpruned teacher model")
        teacher.eval()
        with torch.no_grad():
            targets = torch.cat([teacher(inputs[i:i + 512]) for i in range(0, inputs.shape[0], 512)])

        # The loop hands the loss each batch's "labels": here dataset indices, to look up both targets.
        def loss_fn(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.log_softmax(targets[index] / temperature, dim=-1),
                            log_target=True, reduction="none").sum(-1) * temperature ** 2
            return alpha * soft + (1 - alpha) * F.cross_entropy(logits, labels[index], reduction="none")

        history = train_classifier(student, inputs, torch.arange(inputs.shape[0]), epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn,
                                   description="Recovery fine-tune (distillation)")
    trainable = sum(p.numel() for p in unique_parameters(student) if p.requires_grad)
    return RecoveryResult(objective, "full", history.steps, time.perf_counter() - started, epochs * inputs.shape[0],
                          0, lr, trainable, 0, list(history.losses))


class RecoveryRecipe(RecipeModel):
    """Every setting of ``prunekit train recover``."""

    renamed: ClassVar[dict[str, str]] = {"sparsity": "ratio"}

    model: str | None = None
    blocks: str | None = blocks_field()
    prune: str | None = Field(None, description="one-shot method to prune with first (wanda, sparsegpt, magnitude)")
    ratio: float = Field(0.5, ge=0, lt=1, description="with prune: the fraction of the weights removed")
    mode: Update = Field("full", description="full: every parameter, the pruned zeros held; lora: a masked LoRA, "
                                             "merged at the end")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float | None = Field(None, gt=0, description="peak learning rate; unset: 2e-5 full, 2e-4 lora")
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps warming up")
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

    def plan(self) -> FineTunePlan:
        """The fine-tune: the language-model loss, every parameter (the tied embedding too) or a LoRA, zeros kept."""
        lr = self.lr if self.lr is not None else (2e-5 if self.mode == "full" else 2e-4)
        return FineTunePlan(objective="plain", update=self.mode, keep_zeros=True, steps=self.steps, lr=lr,
                            batch_size=self.batch_size, warmup_steps=int(self.warmup * self.steps),
                            weight_decay=self.weight_decay, train_embeddings=True, rank=self.rank, alpha=self.alpha,
                            seed=self.seed)


def run_recovery(recipe: RecoveryRecipe, loaded=None) -> dict:
    """Prune (optionally), measure, fine-tune keeping the mask, measure again. Returns the report."""
    from prunekit.core.text import TextProtocol, calibration_windows, test_windows
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.evaluate.report import environment
    from prunekit.models.loading import CAUSAL_LM, load_model
    from prunekit.weights.pipeline import prune_weights

    from prunekit.models.base import adapter_for

    loaded = loaded or load_model(recipe.model, kind=CAUSAL_LM)
    loaded.require_tokenizer()
    adapter_for(loaded.model, blocks=recipe.blocks)  # --blocks holds for pruning and the layers recovered
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
        pruned = prune_weights(loaded.model, recipe.prune, recipe.ratio, calibration=calibration)
        report["pruning"] = {"method": recipe.prune, "ratio": recipe.ratio,
                             "achieved": pruned.achieved_sparsity, "seconds": time.perf_counter() - started}
    layers = pruned_layers(loaded.model)
    before_masks = zero_masks(layers)
    perplexities["pruned"] = perplexity(loaded.model, test, 4, "Perplexity (pruned)").perplexity
    train_protocol = TextProtocol(calibration=protocol.calibration, calibration_samples=recipe.train_windows,
                                  seq_len=recipe.train_seq_len, seed=recipe.seed + 1, split=protocol.split,
                                  text_field=protocol.text_field)
    windows = calibration_windows(loaded.tokenizer, train_protocol)
    result = recover(loaded.model, windows, recipe.plan(), layers=layers,
                     description=f"Recovery fine-tuning ({recipe.mode})")
    after_masks = zero_masks(layers)
    revived = sum(int((before & ~after_masks[name]).sum()) for name, before in before_masks.items())
    if revived:
        raise RuntimeError(f"recovery revived {revived} pruned weights; this is a prunekit bug")
    perplexities["recovered"] = perplexity(loaded.model, test, 4, "Perplexity (recovered)").perplexity
    zeros = sum(int(mask.sum()) for mask in after_masks.values())
    total = sum(mask.numel() for mask in after_masks.values())
    described = train_protocol.describe()
    report.update({
        "perplexity": perplexities,
        "recovery": result.to_dict(),
        "training_text": f"{described['calibration_windows']} from {described['calibration_split']}",
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
        rows.append(("one-shot pruning", f"{report['pruning']['method']} {report['pruning']['ratio']:.0%} "
                                         f"(achieved {report['pruning']['achieved']:.2%})"))
    rows += [("recovery", f"{rec['update']}: {rec['steps']} steps, {rec['tokens']:,} tokens, "
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


def _summary(report: dict) -> list[tuple[str, str]]:
    ppl, rec = report["perplexity"], report["recovery"]
    rows = [("perplexity", " → ".join(f"{ppl[k]:.4g} ({k})" for k in ("dense", "pruned", "recovered")
                                      if ppl[k] is not None)),
            ("recovery", f"{rec['update']}: {rec['steps']} steps, {rec['tokens']:,} tokens, {rec['seconds']:.0f} s"),
            ("sparsity of the pruned layers", f"{report['sparsity']['sparsity_in_pruned_layers']:.2%} "
                                              f"(revived weights: {report['sparsity']['revived_weights']})")]
    return rows


class RecoveryJob(Job[RecoveryRecipe]):
    """``prunekit train recover``: fine-tune a one-shot-pruned model keeping its zeros; write it and a report."""

    command = "train recover"
    recipe_type = RecoveryRecipe

    def run(self) -> Outcome:
        from prunekit.models.loading import CAUSAL_LM, load_model

        self.loaded = load_model(self.recipe.model, kind=CAUSAL_LM)
        report = run_recovery(self.recipe, self.loaded)
        return Outcome(report, recovery_markdown(report), _summary(report),
                       f"prunekit train recover: {report['model']}")

    def write(self, directory: Path, outcome: Outcome) -> None:
        from prunekit.io.checkpoint import write_dense

        with status("Saving the recovered model (loads with from_pretrained)"):
            write_dense(self.loaded.model, directory, self.loaded.tokenizer)


__all__ = ["FineTunePlan", "RecoveryJob", "RecoveryRecipe", "RecoveryResult", "distillation_loss", "pruned_layers",
           "recover", "recover_classifier", "run_recovery", "zero_masks"]

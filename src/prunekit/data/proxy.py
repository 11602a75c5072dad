"""Proxy training: one short run of a small model per seed, read by every training-dynamics score.

A :class:`ProxyRun` trains with :func:`prunekit.training.loop.train_classifier` and lets scores
hook in at three places: after every optimizer step (the batch's logits and losses, as forgetting
and AUM need), at the end of chosen epochs (epoch 0 = before training; EL2N, GraNd, VoG read the
model there), and once when the run ends. Evaluation passes (logits and penultimate features of
every example, in eval mode) are computed once per epoch however many scores read them.

The model is a built-in :class:`~prunekit.models.vision.SmallCNN` for images or
:class:`~prunekit.models.vision.MLP` for feature vectors (text uses its sentence embeddings), or
the user's own model (a module, re-initialised per seed, or a factory) and per-example loss. With
``train=False`` the given model is taken as already trained and only the after-training scores apply.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.training.loop import StepInfo, make_optimizer, train_classifier

ModelSpec = Any  # "auto" | "cnn" | "mlp" | nn.Module | Callable[[], nn.Module]


@dataclasses.dataclass
class ProxyConfig:
    """How the proxy model is built and trained; every field is printed in the scores report."""

    model: ModelSpec = "auto"
    epochs: int = 3
    seeds: int = 3
    first_seed: int = 0
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    cnn_width: int = 16
    mlp_hidden: tuple[int, ...] = (256, 128)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    train: bool = True
    standardize: bool | None = None  # None: standardise inputs for the built-in models only
    eval_batch_size: int = 512
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise PrunekitError(f"proxy epochs must be at least 0, got {self.epochs}")
        if self.seeds < 1:
            raise PrunekitError(f"proxy seeds must be at least 1, got {self.seeds}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise PrunekitError("proxy batch sizes must be at least 1")
        if not self.lr > 0:
            raise PrunekitError(f"proxy learning rate must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise PrunekitError(f"proxy optimizer must be sgd or adamw, got '{self.optimizer}'")
        if isinstance(self.model, str) and self.model not in ("auto", "cnn", "mlp"):
            raise PrunekitError(f"proxy model must be auto, cnn or mlp (or a torch module), got '{self.model}'")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def builtin(self) -> bool:
        return isinstance(self.model, str)

    def describe(self) -> dict[str, Any]:
        info = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "loss_fn")}
        info["model"] = self.model if isinstance(self.model, str) else type(self.model).__name__
        info["loss"] = "cross-entropy" if self.loss_fn is None else getattr(self.loss_fn, "__name__", "custom")
        info["mlp_hidden"] = list(self.mlp_hidden)
        return info


def standardize(inputs: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per channel (images) or per feature (vectors); constant ones stay 0."""
    dims = (0, 2, 3) if inputs.ndim == 4 else (0,)
    mean = inputs.mean(dim=dims, keepdim=True)
    std = inputs.std(dim=dims, keepdim=True)
    return (inputs - mean) / torch.where(std > 0, std, torch.ones_like(std))


def build_model(config: ProxyConfig, inputs: torch.Tensor, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised proxy for one seed."""
    from prunekit.models.vision import MLP, SmallCNN

    spec = config.model
    torch.manual_seed(seed)
    if isinstance(spec, str):
        kind = spec if spec != "auto" else ("cnn" if inputs.ndim == 4 else "mlp")
        if kind == "cnn":
            if inputs.ndim != 4:
                raise PrunekitError("the cnn proxy needs images (N, C, H, W); use the mlp proxy for feature vectors")
            height, width = inputs.shape[2], inputs.shape[3]
            if height < 4 or width < 4:
                raise PrunekitError(f"images of {height}x{width} pixels are too small for the cnn proxy (at least 4x4)")
            return SmallCNN(num_classes, width=config.cnn_width, in_channels=inputs.shape[1], image_size=(height, width))
        return MLP(num_classes, in_features=int(inputs[0].numel()), hidden=tuple(config.mlp_hidden))
    if isinstance(spec, nn.Module):
        if not config.train:
            return spec
        model = copy.deepcopy(spec)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        return model
    if callable(spec):
        model = spec()
        if not isinstance(model, nn.Module):
            raise PrunekitError(f"the proxy model factory returned {type(model).__name__}, not a torch module")
        return model
    raise PrunekitError(f"cannot use {type(spec).__name__} as a proxy model")


def penultimate_layer(model: nn.Module) -> nn.Linear | None:
    """The classifier head (last ``nn.Linear``): its input is the feature vector prototypes cluster."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class ProxyRun:
    """One seed's proxy training, with hooks for the scores that read it."""

    def __init__(self, config: ProxyConfig, inputs: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
                 seed: int, stop_epoch: int):
        self.config = config
        self.inputs = inputs
        self.labels = labels
        self.num_classes = num_classes
        self.seed = seed
        self.stop_epoch = stop_epoch if config.train else 0
        self.model = build_model(config, inputs, num_classes, seed).to(config.device)
        self.loss_fn = config.loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
        self._epoch_hooks: dict[int, list[Callable[[ProxyRun], None]]] = {}
        self._step_hooks: list[Callable[[StepInfo], None]] = []
        self._end_hooks: list[Callable[[ProxyRun], None]] = []
        self._cached: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.epoch = 0
        self.history = None

    @property
    def count(self) -> int:
        return int(self.inputs.shape[0])

    # hooks ---------------------------------------------------------------------------------
    def at_epoch(self, epoch: int, hook: Callable[["ProxyRun"], None]) -> None:
        """Run ``hook`` when ``epoch`` epochs have been trained (0: on the initial model)."""
        if epoch > self.stop_epoch:
            raise PrunekitError(f"a score reads the proxy after epoch {epoch}, but the proxy trains "
                                f"{self.stop_epoch} epochs; raise --epochs or lower the score's epoch")
        self._epoch_hooks.setdefault(epoch, []).append(hook)

    def on_step(self, hook: Callable[[StepInfo], None]) -> None:
        self._step_hooks.append(hook)

    def at_end(self, hook: Callable[["ProxyRun"], None]) -> None:
        self._end_hooks.append(hook)

    def run(self) -> None:
        self._fire(0)
        if self.stop_epoch > 0:
            if self.labels is None:
                raise PrunekitError("proxy training needs labels")
            optimizer = make_optimizer(self.model, self.config.optimizer, lr=self.config.lr,
                                       weight_decay=self.config.weight_decay)
            self.history = train_classifier(
                self.model, self.inputs, self.labels, epochs=self.config.epochs, batch_size=self.config.batch_size,
                optimizer=optimizer, seed=self.seed, on_step=self._step if self._step_hooks else None,
                on_epoch=lambda epoch: self._fire(epoch + 1), description=f"Proxy training (seed {self.seed})",
                loss_fn=self.config.loss_fn, stop_epoch=self.stop_epoch)
        self.epoch = self.stop_epoch
        for hook in self._end_hooks:
            hook(self)
        self._cached = None

    def _step(self, info: StepInfo) -> None:
        for hook in self._step_hooks:
            hook(info)

    def _fire(self, epoch: int) -> None:
        self.epoch = epoch
        for hook in self._epoch_hooks.get(epoch, []):
            hook(self)

    # passes over every example, in eval mode ---------------------------------------------------
    def _batches(self):
        size = self.config.eval_batch_size
        for start in range(0, self.count, size):
            stop = min(start + size, self.count)
            labels = None if self.labels is None else self.labels[start:stop].to(self.config.device)
            yield self.inputs[start:stop].to(self.config.device), labels

    def outputs(self, need_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (N, C) and penultimate features (N, D) of every example on the current model."""
        if self._cached is not None and self._cached[0] == self.epoch and (self._cached[2] is not None or not need_features):
            return self._cached[1], self._cached[2]
        head = penultimate_layer(self.model) if need_features else None
        if need_features and head is None:
            raise PrunekitError("prototypes on proxy features need a model whose classifier is an nn.Linear")
        captured: list[torch.Tensor] = []
        handle = None
        if head is not None:
            handle = head.register_forward_pre_hook(
                lambda _module, args: captured.append(args[0].detach().flatten(1).float().cpu()))
        was_training = self.model.training
        self.model.eval()
        logits = []
        try:
            with torch.no_grad():
                for x, _ in self._batches():
                    logits.append(self.model(x).float().cpu())
        finally:
            if handle is not None:
                handle.remove()
            self.model.train(was_training)
        all_logits = torch.cat(logits)
        if all_logits.ndim != 2:
            raise PrunekitError(f"the proxy model returns shape {tuple(all_logits.shape[1:])} per example; "
                                "scores need class logits (N, C)")
        if not torch.isfinite(all_logits).all():
            raise PrunekitError(f"the proxy model's outputs are not finite (seed {self.seed}, epoch {self.epoch}); "
                                "lower the learning rate")
        features = torch.cat(captured) if captured else None
        self._cached = (self.epoch, all_logits, features)
        return all_logits, features

    def gradient_norms(self) -> torch.Tensor:
        """The norm of every example's own loss gradient over all trainable parameters (eval mode)."""
        from torch.func import functional_call, grad, vmap

        model = self.model
        was_training = model.training
        model.eval()
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        loss_fn = self.loss_fn

        def example_loss(parameters, x, y):
            logits = functional_call(model, (parameters, buffers), (x.unsqueeze(0),))
            return loss_fn(logits, y.unsqueeze(0)).sum()

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        norms = []
        try:
            size = max(1, self.config.eval_batch_size // 4)  # per-example gradients: one parameter copy per example
            for start in range(0, self.count, size):
                x = self.inputs[start:start + size].to(self.config.device)
                y = self.labels[start:start + size].to(self.config.device)
                grads = per_example(params, x, y)
                squared = sum(g.pow(2).flatten(1).sum(dim=1) for g in grads.values())
                norms.append(squared.sqrt().cpu())
        finally:
            model.train(was_training)
        return torch.cat(norms)

    def input_gradients(self, consume: Callable[[int, torch.Tensor], None]) -> None:
        """Gradient of each example's true-class logit with respect to its input, batch by batch."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            start = 0
            for x, y in self._batches():
                x = x.clone().requires_grad_(True)
                logits = model(x)
                (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
                consume(start, grad.detach().cpu())
                start += x.shape[0]
        finally:
            model.train(was_training)

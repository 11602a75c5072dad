"""What every sparse-training method shares at run time: the layers it sparsifies, their masks, and
how masks change.

A method's settings are a ``SparseTrainingMethod`` (``training/method.py``); ``method.create(model,
sparsity)`` makes a ``Sparsifier`` on the model (masks attach as ``WeightMask`` parametrizations,
the same mechanism as one-shot pruning), then ``sparsifier.step()`` is called after every
``optimizer.step()``. Invariants kept by this class, whatever the method:

- the forward, the gradients and ``state_dict`` see ``weight * mask``;
- a pruned weight's stored value is 0 and stays 0: its gradient is masked, its optimizer state is
  zeroed when it is pruned, and ``step()`` re-zeroes it in case an optimizer moves zeros anyway;
- a weight that (re)grows starts from 0 with fresh optimizer state (momentum and Adam moments reset);
- masks change only inside ``step()`` (or at construction), and every change is recorded in
  ``history`` with the per-layer sparsity, for reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.allocation import Allocation, LayerInfo, get_allocation
from prunekit.core.allocation.base import name_matches
from prunekit.core.masks import WeightMask, attach_mask, get_mask, pruned_count
from prunekit.core.patterns import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DISTRIBUTIONS = ("uniform", "er", "erk", "global", "lamp")

ScoreMap = Mapping[str, torch.Tensor]


@dataclass
class SparseLayer:
    """One weight tensor under a mask: ``module.<tensor>`` is parametrized by a ``WeightMask``."""

    name: str
    module: nn.Module
    tensor: str = "weight"

    @property
    def parametrization(self) -> WeightMask:
        found = get_mask(self.module, self.tensor)
        if found is None:
            raise PrunekitError(f"the mask of {self.name} was removed (squashed?); this sparsifier can no longer run")
        return found

    @property
    def mask(self) -> torch.Tensor:
        return self.parametrization.mask

    @property
    def original(self) -> nn.Parameter:
        """The trainable tensor behind the mask: what the optimizer updates."""
        return self.module.parametrizations[self.tensor].original

    @property
    def weight(self) -> torch.Tensor:
        """The effective (masked) weight, as the forward sees it."""
        return getattr(self.module, self.tensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def active(self) -> int:
        return int(torch.count_nonzero(self.mask))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / max(self.numel, 1)

    def info(self) -> LayerInfo:
        return LayerInfo(self.name, self.shape)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters held by more than one module (tied embeddings and heads)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for _, parameter in module.named_parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
        if parametrize.is_parametrized(module):
            for name in module.parametrizations.keys():
                original = module.parametrizations[name].original
                owners[id(original)] = owners.get(id(original), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _weight_parameter(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def select_layers(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = (),
                  what: str = "sparsifier") -> list[tuple[str, nn.Module]]:
    """Linear and convolution layers, in model order.

    By default every such layer except tied weights and a Hugging Face model's output head (the
    usual practice for language models). ``include`` / ``exclude`` take globs or ``re:`` regexes.
    """
    shared = _shared_parameter_ids(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or not name:
            continue
        explicitly = bool(include) and name_matches(name, list(include))
        if include and not explicitly:
            continue
        if exclude and name_matches(name, list(exclude)):
            continue
        if id(_weight_parameter(module)) in shared:
            if explicitly:
                raise PrunekitError(f"{what}: layer {name} shares its weight with another module (tied embeddings); "
                                    "untie it before sparsifying it")
            continue
        if module is head and not explicitly:
            continue
        chosen.append((name, module))
    if not chosen:
        raise PrunekitError(f"{what}: no linear or convolution layer to sparsify"
                            + (f" matches include {list(include)}" if include else "")
                            + (f" after exclude {list(exclude)}" if exclude else ""))
    return chosen


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise PrunekitError(f"{what} must be a positive whole number of steps, got {value!r}")
    return int(value)


def check_step(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise PrunekitError(f"{what} must be a step number >= 0, got {value!r}")
    return int(value)


def check_fraction(value: Any, what: str, low_open: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PrunekitError(f"{what} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0) or math.isnan(value):
        raise PrunekitError(f"{what} must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value}")
    return value


class Sparsifier:
    """The optimizer-like interface: build on a model, call ``step()`` after each ``optimizer.step()``.

    Made by ``method.create(model, sparsity, distribution, ...)``, or directly with the method's
    settings as keywords (``GMP(model, 0.5, end_step=1000)``), validated as the method validates
    them. ``distribution`` decides each layer's share of the sparsity: ``uniform``, ``er``, ``erk``
    (``{"name": "erk", "dense_first_layer": True}``), ``global`` or ``lamp`` (by the method's
    scores), or any registered allocation; by default the method's own. ``optimizer`` (optional,
    also settable later with ``attach_optimizer``) lets mask changes reset the state of pruned and
    regrown weights.
    """

    method_class: ClassVar[type[SparseTrainingMethod]]
    signed_scores: ClassVar[bool] = False
    """Scores whose sign matters (GraSP): distributions that square scores (LAMP) do not apply."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method_class" in cls.__dict__:
            cls.method_class.sparsifier = cls  # what the method's create() builds

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | Allocation | None = None,
                 *, method: SparseTrainingMethod | None = None, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), optimizer: torch.optim.Optimizer | None = None, seed: int = 0,
                 **settings: Any):
        self.method = self._method(method, settings)
        self.name = self.method.name
        self.model = model
        self.target_sparsity = check_sparsity(sparsity, f"{self.name}: sparsity")
        self.distribution = get_allocation(distribution if distribution is not None
                                           else self.method.default_distribution)
        if "activations" in self.distribution.needs:
            raise PrunekitError(f"{self.name}: distribution '{self.distribution.name}' needs calibration activations; "
                                f"use one of {', '.join(DISTRIBUTIONS)}")
        if self.signed_scores and self.distribution.name == "lamp":
            raise PrunekitError(f"{self.name}: its scores are signed, but lamp ranks squared scores; use global or uniform")
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.seed = int(seed)
        self.optimizer = optimizer
        self.steps = 0
        self.history: list[dict] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._closed = False
        self.prepare()
        self.layers = [SparseLayer(name, module) for name, module in self._select(model)]
        self._by_name = {layer.name: layer for layer in self.layers}
        for layer in self.layers:
            existing = get_mask(layer.module)
            if existing is None:
                attach_mask(layer.module, torch.ones_like(layer.module.weight, dtype=torch.bool))
        self.enforce_masks()
        if "gradients" in self.needs:
            for layer in self.layers:
                self._hooks.append(layer.parametrization.register_forward_hook(self._gradient_hook(layer.name)))
        self.record("start")
        self.start()

    def _method(self, method: SparseTrainingMethod | None, settings: Mapping[str, Any]) -> SparseTrainingMethod:
        if method is None:
            return SPARSIFIERS.build(self.method_class.name, **settings)
        if settings:
            raise PrunekitError(f"{method.name}: give its settings in the method object or as keywords, not both")
        if not isinstance(method, self.method_class):
            raise PrunekitError(f"{type(self).__name__} runs {self.method_class.name}, not {method.name}")
        return method

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs

    # ----- pieces a method may override -------------------------------------------------------

    def prepare(self) -> None:
        """Derive what the run needs from the settings and the sparsity (schedules, round targets).

        Runs before the model is touched, so a refusal here leaves the model as it was.
        """

    def start(self) -> None:
        """The masks at step 0, once every layer carries one (pruning at initialisation, a first prune)."""

    def _select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return select_layers(model, self.include, self.exclude, self.name)

    def update(self) -> bool:
        """Change the masks if this step calls for it (``self.steps`` optimizer steps are done)."""
        return False

    def wants_gradients_at(self, step: int) -> bool:
        """Whether the update after optimizer step ``step`` reads gradients."""
        return False

    def derived_settings(self) -> dict:
        """What the run made of the settings (e.g. a lottery ticket's per-round sparsities), for reports."""
        return {}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # ----- the public interface ---------------------------------------------------------------

    def step(self) -> bool:
        """Call after ``optimizer.step()``; returns whether the masks changed at this step."""
        if self._closed:
            raise PrunekitError(f"{self.name}: the masks were squashed; this sparsifier can no longer step")
        self.steps += 1
        self.enforce_masks()
        changed = self.update()
        # gradients captured for this step's update are spent; the next window starts empty
        self._captured.clear()
        return changed

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer

    @property
    def sparsity(self) -> float:
        """Sparsity over the sparsified layers (share of masked-out weights)."""
        total = sum(layer.numel for layer in self.layers)
        return 1.0 - sum(layer.active for layer in self.layers) / max(total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {layer.name: layer.sparsity for layer in self.layers}

    def masks(self) -> dict[str, torch.Tensor]:
        return {layer.name: layer.mask.clone() for layer in self.layers}

    def describe(self) -> dict:
        """The method's name and every setting, with the sparsity, distribution, seed and layers of this run."""
        return {"name": self.name, "sparsity": self.target_sparsity,
                "distribution": {"name": self.distribution.name, **self.distribution.model_dump(by_alias=True)},
                "seed": self.seed, "layers": [layer.name for layer in self.layers],
                **self.method.model_dump(mode="json", by_alias=True), **self.derived_settings()}

    @torch.no_grad()
    def enforce_masks(self) -> None:
        """Pruned weights hold exactly 0 (the invariant that makes regrowth start from zero)."""
        for layer in self.layers:
            layer.original.masked_fill_(~layer.mask, 0)

    def squash(self) -> nn.Module:
        """Bake the masks into the weights and remove the parametrizations; the sparsifier is done."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer in self.layers:
            module = layer.module
            if parametrize.is_parametrized(module, layer.tensor):
                parametrize.remove_parametrizations(module, layer.tensor, leave_parametrized=True)
            self._after_squash(layer)
        self._closed = True
        return self.model

    def _after_squash(self, layer: SparseLayer) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "masks": self.masks(), "history": list(self.history),
                "extra": self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise PrunekitError(f"this checkpoint holds a '{state.get('name')}' sparsifier, not '{self.name}'")
        masks = state["masks"]
        missing = [layer.name for layer in self.layers if layer.name not in masks]
        if missing:
            raise PrunekitError(f"the checkpoint has no mask for layer {missing[0]}")
        with torch.no_grad():
            for layer in self.layers:
                if tuple(masks[layer.name].shape) != layer.shape:
                    raise PrunekitError(f"the checkpoint's mask for {layer.name} has shape "
                                        f"{tuple(masks[layer.name].shape)}, the layer {layer.shape}")
                self._write_mask(layer, masks[layer.name].to(layer.mask.device, torch.bool))
        self.steps = int(state["steps"])
        self.history = list(state.get("history", []))
        self._load_extra_state(state.get("extra", {}))
        self.enforce_masks()

    # ----- helpers for methods ----------------------------------------------------------------

    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        return {layer.name: layer.weight.detach().abs() for layer in self.layers}

    def allocate(self, sparsity: float, scores: ScoreMap | None = None) -> dict[str, float]:
        """Per-layer sparsity for an overall target, by the distribution (scores for global/LAMP)."""
        infos = [layer.info() for layer in self.layers]
        score_fn: Callable[[str], torch.Tensor] | None = None
        if "scores" in self.distribution.needs:
            if scores is None:
                raise PrunekitError(f"{self.name}: distribution '{self.distribution.name}' needs scores")
            ranked = global_ranks(scores) if self.signed_scores else scores
            score_fn = lambda name: ranked[name]  # noqa: E731
        return self.distribution.allocate(infos, sparsity, score_fn)

    def masks_from_scores(self, scores: ScoreMap, sparsities: Mapping[str, float],
                          monotone_from: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per layer, keep the highest scores.

        With ``monotone_from`` (masks to start from) pruning is monotone: weights pruned there stay
        pruned, and a layer never ends up with fewer pruned weights than it had.
        """
        masks = {}
        for layer in self.layers:
            score = scores[layer.name].detach().float()
            count = pruned_count(layer.numel, sparsities[layer.name])
            if monotone_from is not None:
                current = monotone_from[layer.name].to(score.device)
                count = max(count, layer.numel - int(current.sum()))
                score = score.masked_fill(~current, -math.inf)
            masks[layer.name] = drop_lowest(score, count)
        return masks

    def random_scores(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {layer.name: torch.rand(layer.shape, generator=generator).to(layer.mask.device)
                for layer in self.layers}

    def generator(self, *salt: int) -> torch.Generator:
        """A generator fixed by the seed and ``salt`` (e.g. the step), so resuming replays the same draws."""
        value = self.seed
        for item in salt:
            value = (value * 1_000_003 + int(item) + 1) % (2**63 - 1)
        return torch.Generator().manual_seed(value)

    @torch.no_grad()
    def apply_masks(self, masks: Mapping[str, torch.Tensor], event: str) -> None:
        """Install new masks: newly pruned weights become 0, newly grown ones start at 0 with fresh state."""
        for layer in self.layers:
            new = masks[layer.name].to(layer.mask.device, torch.bool)
            old = layer.mask
            changed = new ^ old
            if changed.any():
                layer.original.masked_fill_(changed, 0)
                self._reset_optimizer_state(layer.original, changed)
                self._write_mask(layer, new)
        self.record(event)

    def _write_mask(self, layer: SparseLayer, mask: torch.Tensor) -> None:
        layer.mask.copy_(mask)

    def _reset_optimizer_state(self, parameter: torch.Tensor, positions: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(parameter)
        if not state:
            return
        for value in state.values():
            # momentum buffers, Adam's first and second moments: anything shaped like the weight
            if torch.is_tensor(value) and value.shape == parameter.shape:
                value.masked_fill_(positions.to(value.device), 0)

    def record(self, event: str) -> None:
        active = {layer.name: layer.active for layer in self.layers}
        total = sum(layer.numel for layer in self.layers)
        self.history.append({"step": self.steps, "event": event,
                             "sparsity": 1.0 - sum(active.values()) / max(total, 1),
                             "layers": {layer.name: 1.0 - active[layer.name] / max(layer.numel, 1)
                                        for layer in self.layers}})

    def gradients(self) -> dict[str, torch.Tensor]:
        """Dense gradients of the effective weights from the backward passes since the last update."""
        missing = [layer.name for layer in self.layers if layer.name not in self._captured]
        if missing:
            raise PrunekitError(f"{self.name} grows weights by their gradient, but no gradient reached {missing[0]} "
                                "before this update; call sparsifier.step() right after optimizer.step() in a loop "
                                "that runs loss.backward()")
        return dict(self._captured)

    def _gradient_hook(self, name: str):
        def on_forward(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # the forward of step ``steps + 1``: keep its gradient only if that step's update reads it
            if torch.is_grad_enabled() and output.requires_grad and self.wants_gradients_at(self.steps + 1):
                def keep(grad: torch.Tensor) -> None:
                    previous = self._captured.get(name)
                    self._captured[name] = grad.detach().clone() if previous is None else previous + grad.detach()
                output.register_hook(keep)
        return on_forward


class TrainsInRounds(Protocol):
    """What a sparsifier whose method needs "rounds" tells the training loop (a lottery ticket does).

    The loop trains ``steps_per_round`` steps; after a round's last step the sparsifier prunes and
    rewinds the weights to ``rewind_step``, and the loop trains again from that step with a fresh
    optimizer and the data order and learning rate of that step, until ``finished``. ``round``
    counts the pruning rounds done, ``round_step`` the steps done in the current round.
    """

    steps_per_round: int
    rewind_step: int
    round: int
    round_step: int
    pruning_rounds: int
    finished: bool
    sparsity: float


def global_ranks(scores: ScoreMap) -> dict[str, torch.Tensor]:
    """Signed scores replaced by their rank among all layers' scores (0 = lowest).

    Allocations rank non-negative importances (the global threshold reads magnitudes); ranks keep
    the order of signed scores such as GraSP's across layers, so their per-layer counts stay exact.
    """
    names = list(scores)
    flat = torch.cat([scores[name].detach().reshape(-1).double().cpu() for name in names])
    ranks = torch.empty_like(flat)
    ranks[flat.argsort(stable=True)] = torch.arange(flat.numel(), dtype=torch.float64)
    result, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        result[name] = ranks[offset:offset + size].reshape(scores[name].shape)
        offset += size
    return result


def drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask without the ``count`` lowest scores (exactly ``count`` of them, whatever the ties)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        drop = torch.topk(scores.reshape(-1), count, largest=False, sorted=False).indices
        mask.view(-1)[drop] = False
    return mask


def iterate_batches(data: Iterable[Any], count: int) -> list[Any]:
    batches = []
    for batch in data:
        batches.append(batch)
        if len(batches) >= count:
            break
    if not batches:
        raise PrunekitError("no data: the scoring batches are empty")
    return batches

"""Calibration statistics for activation-aware importance: per-channel moments of layer inputs,
and gradients for Taylor scores.

Inputs are recorded where weights consume them (the columns of a Linear, the input channels
of a convolution). Hugging Face language models are calibrated one block at a time with
``prunekit.core.calibration.run_sequential``; any other model runs whole, batch by batch, with
forward hooks. Either way only one batch of activations is alive at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.calibration import HEAD, Target, run_sequential
from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter
from prunekit.models.layout import is_linear_like
from prunekit.structure.graph import DependencyGraph


class ChannelMoments(LayerStatistics):
    """Count, sum and sum of squares of every input channel over all calibration positions."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", channel_dim: int = -1):
        super().__init__(in_features, device)
        self.channel_dim = channel_dim
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().movedim(self.channel_dim, -1).reshape(-1, inputs.shape[self.channel_dim]).double()
        self.total += x.sum(0)
        self.squares += x.square().sum(0)
        self.rows += x.shape[0]

    def accumulators(self) -> list[torch.Tensor]:
        return [self.total, self.squares]

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.rows, 1)).float()

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance of each channel (FLAP's fluctuation)."""
        n = max(self.rows, 2)
        return ((self.squares - self.total.square() / n) / (n - 1)).clamp_min(0).float()

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ over every position (Wanda's activation norm)."""
        return self.squares.sqrt().float()


def consumer_calls(graph: DependencyGraph, weights: Iterable[str]) -> dict[str, tuple[str, int]]:
    """weight name -> (module calling it, channel dim of its input), for Linear and convolution weights."""
    wanted = set(weights)
    result: dict[str, tuple[str, int]] = {}
    for call in graph.calls:
        if call.weight in wanted and call.kind in ("linear", "conv") and call.weight not in result:
            result[call.weight] = (call.module, call.channel_dim)
    return result


def input_moments(model: nn.Module, graph: DependencyGraph, weights: Iterable[str], batches: Sequence,
                  adapter: ModelAdapter | None = None, windows: torch.Tensor | None = None,
                  batch_size: int = 4) -> dict[str, ChannelMoments]:
    """Moments of the inputs each named weight consumes, from one dense pass over the calibration data.

    ``windows`` (token ids) with an ``adapter`` runs block by block; otherwise every element of
    ``batches`` (a tuple of positional inputs or a dict of keyword inputs) runs through the model.
    """
    calls = consumer_calls(graph, weights)
    if not calls:
        return {}
    if windows is not None and adapter is not None:
        return _moments_sequential(model, adapter, calls, windows, batch_size)
    stats: dict[str, ChannelMoments] = {}
    modules = {}
    for weight, (module_name, channel_dim) in calls.items():
        module = model.get_submodule(module_name) if module_name else model
        columns = graph.tensors[weight].shape[graph.input_dims.get(weight, 1)]
        moments = ChannelMoments(columns * _groups_of(module), channel_dim=channel_dim)
        stats[weight] = moments
        modules.setdefault(id(module), (module, []))[1].append(moments)
    hooks = {}
    for module, collectors in modules.values():
        def hook(_module, args, collectors=collectors):
            for moments in collectors:
                moments.add(args[0])
        hooks[module] = hook
    feed_batches(model, batches, hooks)
    return stats


def feed_batches(model: nn.Module, batches: Sequence, pre_hooks: Mapping[nn.Module, Callable]) -> None:
    """Run every batch through the model in eval mode without gradients, with ``pre_hooks`` (module ->
    forward pre-hook) installed for the duration; the hooks and the training mode are restored."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def block_of_modules(adapter: ModelAdapter) -> dict[str, int]:
    """Full module name -> index of the block that contains it, for every module inside the blocks."""
    block_of: dict[str, int] = {}
    for index, block in enumerate(adapter.blocks()):
        for local, _module in block.named_modules():
            block_of[f"{adapter.block_name(index)}.{local}" if local else adapter.block_name(index)] = index
    return block_of


def _groups_of(module: nn.Module) -> int:
    return getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1


def run_batch(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _MomentsProcessor:
    def __init__(self, wanted: dict[str, str]):
        self.wanted = wanted  # module name -> weight name
        self.stats: dict[str, ChannelMoments] = {}

    def statistics(self, target: Target) -> type[LayerStatistics]:
        return ChannelMoments

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        assert isinstance(stats, ChannelMoments)
        self.stats[self.wanted[target.name]] = stats


def _moments_sequential(model: nn.Module, adapter: ModelAdapter, calls: dict[str, tuple[str, int]],
                        windows: torch.Tensor, batch_size: int) -> dict[str, ChannelMoments]:
    block_of = block_of_modules(adapter)
    head = adapter.head()
    targets, wanted = [], {}
    for weight, (module_name, _dim) in calls.items():
        module = model.get_submodule(module_name)
        if not is_linear_like(module):
            raise PrunekitError(f"block-by-block calibration only records Linear inputs; {module_name} is "
                                f"{type(module).__name__}")
        transposed = type(module).__name__ == "Conv1D"  # weight stored (in, out)
        if module_name in block_of:
            targets.append(Target(module_name, module, block_of[module_name], transposed=transposed))
        elif module is head:
            targets.append(Target(module_name, module, HEAD, transposed=transposed))
        else:
            raise PrunekitError(f"{module_name} lies outside the model's blocks; calibrate it with whole-model batches")
        wanted[module_name] = weight
    processor = _MomentsProcessor(wanted)
    run_sequential(model, adapter, windows, targets, processor, mode="dense", batch_size=batch_size,
                   description="Calibrating (activation statistics)")
    return processor.stats


def one_sample_parts(batch, target=None) -> list[tuple[object, object, float]]:
    """A batch (keyword inputs, or a tuple of positional ones) and its target split into single
    samples, each with its share of the batch's mean loss, so the summed gradient is the batch's
    (samples of equal length: a calibration declares it). The backward pass of a whole batch holds its
    vocabulary-wide logits and their gradient at once: prunekit's Taylor scores on SmolLM2 peaked at
    6.4 GB in batches of 4 windows against Torch-Pruning's 3.1 GB one by one."""
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        return [(batch, target, 1.0)]
    size = first.shape[0]
    split = lambda value, i: value[i:i + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (size,) else value  # noqa: E731
    if isinstance(batch, dict):
        parts = [{key: split(value, i) for key, value in batch.items()} for i in range(size)]
    else:
        parts = [type(batch)(split(value, i) for value in batch) for i in range(size)]
    return [(part, split(target, i), 1.0 / size) for i, part in enumerate(parts)]


def accumulate_gradients(model: nn.Module, batches: Sequence, loss_fn: Callable[[nn.Module, object, object], torch.Tensor],
                         tensors: Iterable[str], targets: Sequence | None = None,
                         one_sample_at_a_time: bool = False,
                         each_sample: Callable[[Mapping[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """Sum of ∂loss/∂w over the calibration batches for the named parameters (others get no grad).
    ``one_sample_at_a_time`` (dict batches of equal-length samples) gives the same sum with one
    sample per backward pass. ``each_sample`` instead receives the gradients of every single sample's
    loss (name -> gradient; batches are always split), and nothing is summed: the result is empty."""
    wanted = set(tensors)
    parameters = dict(model.named_parameters())
    previous = {name: p.requires_grad for name, p in parameters.items()}
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in wanted)
        parameter.grad = None
    was_training = model.training
    model.eval()  # no dropout: the scores describe the deployed model
    try:
        for index, batch in enumerate(batches):
            target = targets[index] if targets is not None else None
            split = one_sample_at_a_time or each_sample is not None
            parts = one_sample_parts(batch, target) if split else [(batch, target, 1.0)]
            for part, part_target, share in parts:
                loss = loss_fn(model, part, part_target)
                if not torch.isfinite(loss):
                    raise PrunekitError("the calibration loss is NaN or inf; gradient-based scores (taylor, fisher) cannot be computed")
                if each_sample is None:
                    (loss * share).backward()
                    continue
                loss.backward()
                each_sample({name: parameters[name].grad for name in wanted
                             if name in parameters and parameters[name].grad is not None})
                for name in wanted:
                    if name in parameters:
                        parameters[name].grad = None
        gradients = {name: parameters[name].grad.detach().clone() for name in wanted
                     if name in parameters and parameters[name].grad is not None}
    finally:
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(previous[name])
        model.train(was_training)
    return gradients

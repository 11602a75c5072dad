"""Sequential calibration: run calibration data through a model one block at a time.

Each block sees the outputs of the blocks before it *after* they were processed (pruned), and
only one block's activations for the calibration set are alive at any moment.

Within a block, ``mode="layer"`` goes further: every calibration batch runs as a coroutine
(a greenlet) that pauses on entering each target layer. Once all batches have paused at the
same layer, its statistics are complete, the layer is processed (pruned) and the batches resume
through the processed layer. Later layers of the block therefore see the already-pruned earlier
layers (SparseGPT's "true sequential" order), and the whole block needs a single forward pass
instead of one pass to collect statistics and another to produce outputs. ``mode="block"``
reproduces the reference implementations of Wanda and SparseGPT: statistics of every layer come
from the unpruned block, then a second pass produces the block's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import greenlet
import torch
from torch import nn

from prunekit.core.memory import release_freed_memory
from prunekit.core.progress import progress_bar
from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter

Mode = Literal["layer", "block", "dense"]
HEAD = -1  # block index of targets after the last block (the LM head)


@dataclass(frozen=True)
class Target:
    """A layer to process: its full module name, the module, and its block (HEAD after the blocks)."""

    name: str
    module: nn.Module
    block: int | None


class LayerProcessor(Protocol):
    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        """Which statistics the layer needs (None: none)."""

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        """Called once per target, in execution order, when its statistics are complete."""


class _StopForward(Exception):
    pass


@dataclass
class _Arrival:
    module: nn.Module
    inputs: torch.Tensor


@dataclass
class BlockInputs:
    """What the first block receives for every calibration batch."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    hidden_as_kwarg: bool

    def call(self, block: nn.Module, index: int) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args[index], hidden_states=self.hidden[index], **self.kwargs[index])
        else:
            out = block(self.hidden[index], *self.args[index], **self.kwargs[index])
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    captured: list[tuple[tuple, dict]] = []

    def catch(_module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _StopForward

    device = next(model.parameters()).device
    handle = adapter.blocks()[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    hidden_as_kwarg = not captured[0][0]
    hidden, args, kwargs = [], [], []
    for a, kw in captured:
        if hidden_as_kwarg:
            hidden.append(kw.pop("hidden_states"))
            args.append(tuple(a))
        else:
            hidden.append(a[0])
            args.append(tuple(a[1:]))
        kwargs.append(kw)
    return BlockInputs(hidden, args, kwargs, hidden_as_kwarg)


def _check_finite(tensors: list[torch.Tensor], where: str) -> None:
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise PrunekitError(f"activations became NaN or inf {where}; the model's weights or inputs are not finite")


def _new_stats(processor: LayerProcessor, target: Target) -> LayerStatistics | None:
    cls = processor.statistics(target)
    if cls is None:
        return None
    weight = target.module.weight
    return cls(weight.shape[1], device=weight.device)


def _run_block_layerwise(block: nn.Module, inputs: BlockInputs, targets: dict[nn.Module, Target],
                         processor: LayerProcessor) -> list[torch.Tensor]:
    def pause(module, args):
        greenlet.getcurrent().parent.switch(_Arrival(module, args[0]))

    handles = [module.register_forward_pre_hook(pause) for module in targets]
    runners = [greenlet.greenlet(lambda i=i: inputs.call(block, i)) for i in range(len(inputs.hidden))]
    try:
        events = []
        for index, runner in enumerate(runners):
            events.append(runner.switch())
            # The running block holds its input for as long as it needs it; the list would keep
            # the whole calibration set's block inputs alive until the block ends.
            inputs.hidden[index] = None
        processed: set[nn.Module] = set()
        shared: tuple[type | None, LayerStatistics | None, list[torch.Tensor]] | None = None
        while True:
            arrived = [isinstance(event, _Arrival) for event in events]
            if not any(arrived):
                return events
            module = events[0].module if arrived[0] else None
            if not all(arrived) or any(event.module is not module for event in events):
                raise PrunekitError("calibration batches took different paths through a block; "
                                    "use --sequential block for this model")
            target = targets[module]
            if module in processed:
                raise PrunekitError(f"layer {target.name} runs twice in one forward pass; "
                                    "use --sequential block for this model")
            xs = [event.inputs for event in events]
            cls = processor.statistics(target)
            # Layers fed the very same tensors (q/k/v, gate/up) share one set of statistics.
            if shared is not None and shared[0] is cls and all(a is b for a, b in zip(xs, shared[2])):
                stats = shared[1]
            else:
                stats = _new_stats(processor, target)
                if stats is not None:
                    for x in xs:
                        stats.add(x)
                shared = (cls, stats, xs)
            processor.process(target, stats)
            processed.add(module)
            del xs, events
            events = [runner.switch() for runner in runners]
    finally:
        for handle in handles:
            handle.remove()
        for runner in runners:
            if not runner.dead:
                runner.throw(greenlet.GreenletExit)


def _collect_block(block: nn.Module, inputs: BlockInputs, targets: dict[nn.Module, Target],
                   processor: LayerProcessor) -> tuple[list[Target], dict[nn.Module, LayerStatistics | None], list[torch.Tensor]]:
    order: list[Target] = []
    stats: dict[nn.Module, LayerStatistics | None] = {}
    follows: set[nn.Module] = set()  # layers whose input is the previous layer's input
    state: dict[str, object] = {"batch": 0, "last": None}

    def collect(module, args):
        x = args[0]
        last = state["last"]
        if state["batch"] == 0:
            if module in stats:
                raise PrunekitError(f"layer {targets[module].name} runs twice in one forward pass; not supported")
            order.append(targets[module])
            cls = processor.statistics(targets[module])
            if last is not None and last[0] is x and type(last[1]) is cls and cls is not None:
                stats[module] = last[1]
                follows.add(module)
                return None
            stats[module] = _new_stats(processor, targets[module])
        elif module in follows:
            if last is None or last[0] is not x:
                raise PrunekitError("calibration batches took different paths through a block")
            return None
        if stats[module] is not None:
            stats[module].add(x)
        state["last"] = (x, stats[module])
        return None

    handles = [module.register_forward_pre_hook(collect) for module in targets]
    outputs = []
    try:
        for index in range(len(inputs.hidden)):
            state["batch"], state["last"] = index, None
            outputs.append(inputs.call(block, index))
    finally:
        for handle in handles:
            handle.remove()
    return order, stats, outputs


StatsReducer = Callable[[LayerStatistics], None]


class SequentialCalibration:
    """The calibration activations as they travel block by block, and the steps that move them.

    ``run_sequential`` drives it over an in-memory model; the streaming pipeline drives it over
    blocks materialised one at a time from disk. ``reduce`` (e.g. an all-reduce across processes)
    sees every statistic once it is complete on this process and before it is used.
    """

    def __init__(self, adapter: ModelAdapter, processor: LayerProcessor, mode: Mode = "layer",
                 reduce: StatsReducer | None = None):
        if mode not in ("layer", "block", "dense"):
            raise PrunekitError(f"unknown sequential mode '{mode}'; choose layer, block or dense")
        self.adapter, self.processor, self.mode = adapter, processor, mode
        self.reduce = reduce
        self.inputs: BlockInputs | None = None

    def capture(self, model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
        self.inputs = capture_block_inputs(model, self.adapter, windows, batch_size)
        _check_finite(self.inputs.hidden, "before the first block")

    def _reduced(self, processor: LayerProcessor) -> LayerProcessor:
        if self.reduce is None:
            return processor
        reduce = self.reduce
        done: list[LayerStatistics] = []  # statistics shared by several layers are reduced once

        class Reducing:
            def statistics(self, target: Target):
                return processor.statistics(target)

            def process(self, target: Target, stats: LayerStatistics | None) -> None:
                if stats is not None and not any(stats is seen for seen in done):
                    reduce(stats)
                    done.append(stats)
                processor.process(target, stats)

        return Reducing()

    @torch.no_grad()
    def run_block(self, index: int, block: nn.Module, targets: dict[nn.Module, Target]) -> None:
        """Process the block's targets and replace the activations by the block's outputs."""
        assert self.inputs is not None, "capture() first"
        inputs = self.inputs
        processor = self._reduced(self.processor)
        if not targets:
            outputs = [inputs.call(block, i) for i in range(len(inputs.hidden))]
        elif self.mode == "layer":
            outputs = _run_block_layerwise(block, inputs, targets, processor)
        else:
            order, stats, outputs = _collect_block(block, inputs, targets, processor)
            for target in order:
                processor.process(target, stats[target.module])
            del stats
            if self.mode == "block":
                outputs = [inputs.call(block, i) for i in range(len(inputs.hidden))]
        _check_finite(outputs, f"after block {index}")
        inputs.hidden = outputs
        release_freed_memory()

    @torch.no_grad()
    def run_head(self, targets: list[Target]) -> None:
        """Targets after the blocks (the LM head) see the final norm's output."""
        assert self.inputs is not None
        norm = self.adapter.final_norm()
        processor = self._reduced(self.processor)
        for target in targets:
            stats = _new_stats(processor, target)
            if stats is not None:
                for hidden in self.inputs.hidden:
                    stats.add(norm(hidden) if norm is not None else hidden)
            processor.process(target, stats)


def group_by_block(targets: list[Target]) -> dict[int, dict[nn.Module, Target]]:
    by_block: dict[int, dict[nn.Module, Target]] = {}
    for target in targets:
        if target.block is None:
            raise ValueError(f"{target.name} is outside the blocks; it needs no calibration pass")
        by_block.setdefault(target.block, {})[target.module] = target
    return by_block


def run_sequential(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, targets: list[Target],
                   processor: LayerProcessor, mode: Mode = "layer", batch_size: int = 4,
                   description: str = "Calibrating", reduce: StatsReducer | None = None) -> None:
    """Feed ``windows`` block by block, calling ``processor.process`` on every target as described above.

    ``mode="dense"`` only collects: statistics of every layer of the unmodified model, outputs
    propagated from the same pass (the processor must not change weights).
    """
    calibration = SequentialCalibration(adapter, processor, mode, reduce)
    by_block = group_by_block(targets)
    blocks = adapter.blocks()
    last_block = max((b for b in by_block if b != HEAD), default=-1)
    stop = len(blocks) if HEAD in by_block else last_block + 1
    calibration.capture(model, windows, batch_size)
    with progress_bar(description, stop) as bar:
        for index in range(stop):
            bar.describe(f"{description} block {index + 1}/{len(blocks)}")
            calibration.run_block(index, blocks[index], by_block.get(index, {}))
            bar.advance()
    if HEAD in by_block:
        calibration.run_head(list(by_block[HEAD].values()))

"""Sequential calibration: run calibration data through a model one block at a time.

Each block sees the outputs of the blocks before it *after* they were processed (pruned), and
only one block's activations for the calibration set are alive at any moment. What each block
receives besides its hidden states comes from ``prunekit.core.blocks.capture_block_inputs``.

Within a block, ``mode="layer"`` goes further: every calibration batch runs as a coroutine
(a greenlet) that pauses on entering each target layer. Once all batches have paused at the
same layer, its statistics are complete, the layer is processed (pruned) and the batches resume
through the processed layer. Later layers of the block therefore see the already-pruned earlier
layers (SparseGPT's "true sequential" order), and the whole block needs a single forward pass
instead of one pass to collect statistics and another to produce outputs. ``mode="block"``
reproduces the reference implementations of Wanda and SparseGPT: statistics of every layer come
from the unpruned block, then a second pass produces the block's outputs.

Experts of a mixture are *routed* targets: each sees only the tokens its router sends it, so
batches do not all reach it. Batches pause at the module that routes (``Target.container``)
instead; there each expert tensor's statistics are gathered from its own tokens, stage by stage
(an expert's second layer after its first is processed), by intercepting the linear products the
experts compute, whether the experts are separate layers or slices of one 3-D tensor. An expert no
calibration token reaches is handed to ``processor.unreached`` (when the processor has one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Protocol

import greenlet
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.core.blocks import BlockInputs, BlockStructure, capture_block_inputs, replay_after_blocks
from prunekit.core.memory import release_freed_memory
from prunekit.core.progress import progress_bar
from prunekit.core.statistics import LayerStatistics, TwinInputHessian
from prunekit.errors import PrunekitError

Mode = Literal["layer", "block", "dense"]
HEAD = -1  # block index of targets after the last block (the LM head)


@dataclass(frozen=True, eq=False)
class Target:
    """A weight to process: its full name, the module holding it, and its block (HEAD after the blocks).

    ``tensor`` is the module's parameter; ``expert`` indexes a 3-D expert tensor; ``transposed``
    marks weights stored as (in, out) (transformers' ``Conv1D``, some fused experts). ``container``
    is the module that routes tokens to this weight (mixtures of experts), and ``stage`` the
    position of its kind of layer inside an expert (first and second layer).
    """

    name: str
    module: nn.Module
    block: int | None
    tensor: str = "weight"
    expert: int | None = None
    transposed: bool = False
    container: nn.Module | None = None
    stage: str = ""

    @property
    def parameter(self) -> torch.Tensor:
        return getattr(self.module, self.tensor)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features): a view, so changes made to it reach the model."""
        weight = self.parameter.detach()
        if self.expert is not None:
            weight = weight[self.expert]
        return weight.t() if self.transposed else weight

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def routed(self) -> bool:
        return self.container is not None


class LayerProcessor(Protocol):
    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        """Which statistics the layer needs (None: none)."""

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        """Called once per target, in execution order, when its statistics are complete."""


class _Arrival:
    __slots__ = ("module", "inputs", "kwargs")

    def __init__(self, module: nn.Module, inputs: Any, kwargs: dict | None = None):
        self.module, self.inputs, self.kwargs = module, inputs, kwargs


def _check_finite(tensors: list[torch.Tensor], where: str) -> None:
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise PrunekitError(f"activations became NaN or inf {where}; the model's weights or inputs are not finite")


def _new_stats(processor: LayerProcessor, target: Target) -> LayerStatistics | None:
    cls = processor.statistics(target)
    if cls is None:
        return None
    return cls(target.in_features, device=target.parameter.device)


class _WeightUses(TorchFunctionMode):
    """Sees every linear product that uses a target's weight, and the product's inputs as (tokens, in_features).

    A product is recognised by its weight: the module's parameter itself, or a slice of a 3-D expert
    parameter (whose leading index is the expert), through ``F.linear``, ``matmul`` (on either side)
    or ``addmm``.
    """

    def __init__(self, targets: list[Target]):
        super().__init__()
        self.by_parameter: dict[int, dict[int | None, Target]] = {}
        for target in targets:
            self.by_parameter.setdefault(id(target.parameter), {})[target.expert] = target
        # Slices of 3-D expert tensors, by the identity of the slice: an index given as a tensor makes a
        # copy, not a view, so the slice is recognised when it is taken, not by its storage.
        self.slices: dict[int, tuple[torch.Tensor, Target]] = {}

    def used(self, target: Target, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def _find(self, weight: Any) -> Target | None:
        if not isinstance(weight, torch.Tensor):
            return None
        sliced = self.slices.get(id(weight))
        if sliced is not None and sliced[0] is weight:
            return sliced[1]
        candidates = self.by_parameter.get(id(weight))
        return candidates.get(None) if candidates else None

    def _note_slice(self, parameter: torch.Tensor, index: Any, result: Any) -> None:
        candidates = self.by_parameter.get(id(parameter))
        if not candidates or None in candidates or not isinstance(result, torch.Tensor):
            return
        if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, int) and result.dim() == parameter.dim() - 1:
            target = candidates.get(index % parameter.shape[0])
            if target is not None:
                self.slices[id(result)] = (result, target)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args and id(args[0]) in self.by_parameter:
            result = func(*args, **kwargs)
            self._note_slice(args[0], args[1] if len(args) > 1 else None, result)
            return result
        found, inputs = None, None
        if func is F.linear:
            found = self._find(args[1] if len(args) > 1 else kwargs.get("weight"))
            inputs = args[0] if args else kwargs.get("input")
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) > 1:
            found = self._find(args[1])  # inputs @ weight (a weight stored as (in, out))
            inputs = args[0]
            if found is None:
                found = self._find(args[0])  # weight @ inputs: the inputs are columns
                inputs = args[1].mT if found is not None else None
        elif func in (torch.addmm, torch.Tensor.addmm) and len(args) > 2:
            found = self._find(args[2])
            inputs = args[1]
        if found is not None:
            self.used(found, inputs.detach().reshape(-1, inputs.shape[-1]))
        return func(*args, **kwargs)


class _RoutedRecorder(_WeightUses):
    """Feeds the inputs of every product using a routed target's weight to its statistics."""

    def __init__(self, stats: dict[Target, LayerStatistics | None], order: list[str] | None = None):
        super().__init__(list(stats))
        self.stats = stats
        self.order = order

    def used(self, target: Target, inputs: torch.Tensor) -> None:
        if self.order is not None and target.stage not in self.order:
            self.order.append(target.stage)
        stats = self.stats[target]
        if stats is not None:
            stats.add(inputs)


class _Reach(_WeightUses):
    """Which targets the block uses without calling their module (a weight multiplied directly), and inside
    which module: those are calibrated like experts, pausing there."""

    def __init__(self, targets: list[Target], stack: list[nn.Module]):
        super().__init__(targets)
        self.stack = stack
        self.inside: dict[Target, nn.Module] = {}

    def used(self, target: Target, inputs: torch.Tensor) -> None:
        current = self.stack[-1] if self.stack else None
        if current is not target.module and current is not None and target not in self.inside:
            self.inside[target] = current


def _how_reached(block: nn.Module, index: int, inputs: BlockInputs, targets: list[Target]) -> list[Target]:
    """Run the block on the probe tokens (carrying them on to the next block) and turn every target whose
    weight is used without calling its module into one calibrated where it is used."""
    if inputs.probe_hidden is None:
        return targets
    direct = [t for t in targets if not t.routed]
    stack: list[nn.Module] = []
    handles = []
    def enter(module, _args) -> None:
        stack.append(module)

    def leave(_module, _args, _output) -> None:  # a hook returning something would replace the output
        stack.pop()

    for module in block.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    reach = _Reach(direct, stack)
    try:
        with _eager_experts(targets), reach:
            inputs.probe_hidden = inputs.call_probe(block, index)
    finally:
        for handle in handles:
            handle.remove()
    if not reach.inside:
        return targets
    return [replace(t, container=reach.inside[t], stage=t.name) if t in reach.inside else t for t in targets]


@contextmanager
def _eager_experts(targets: list[Target]) -> Iterator[None]:
    """Fused experts run their reference (per-expert loop) implementation while calibrating: batched kernels
    (grouped_mm) multiply every expert at once, so no product names its expert."""
    configs = {id(c): c for t in targets if t.expert is not None
               for c in [getattr(t.module, "config", None)] if c is not None and hasattr(c, "_experts_implementation")}
    saved = {key: config._experts_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._experts_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._experts_implementation = saved[key]


def _routed_groups(targets: list[Target]) -> dict[nn.Module, list[Target]]:
    groups: dict[nn.Module, list[Target]] = {}
    for target in targets:
        if target.routed:
            groups.setdefault(target.container, []).append(target)
    return groups


def _process_routed(container: nn.Module, targets: list[Target], calls: list[tuple[tuple, dict]],
                    processor: "_Processing") -> None:
    """Process the experts behind ``container``, stage by stage, from the tokens routed to each."""
    order: list[str] = []
    with _eager_experts(targets):
        with _RoutedRecorder({t: None for t in targets}, order):  # which kind of layer runs first
            for args, kwargs in calls:
                container(*args, **kwargs)
        stages = order + sorted({t.stage for t in targets} - set(order))
        for stage in stages:
            chosen = [t for t in targets if t.stage == stage]
            stats = {t: _new_stats(processor, t) for t in chosen}
            if any(s is not None for s in stats.values()):
                with _RoutedRecorder(stats):
                    for args, kwargs in calls:
                        container(*args, **kwargs)
            for target in chosen:
                processor.handle(target, stats[target])


class _Processing:
    """The processor, with cross-process reduction and the routing of experts no token reached."""

    def __init__(self, processor: LayerProcessor, reduce: Callable[[LayerStatistics], None] | None):
        self.processor, self.reduce = processor, reduce
        self.reduced: list[LayerStatistics] = []  # statistics shared by several layers are reduced once
        self.done: set[Target] = set()

    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        return self.processor.statistics(target)

    def handle(self, target: Target, stats: LayerStatistics | None) -> None:
        self.done.add(target)
        if stats is not None and self.reduce is not None and not any(stats is seen for seen in self.reduced):
            self.reduce(stats)
            self.reduced.append(stats)
        if stats is not None and stats.rows == 0 and target.routed:
            unreached = getattr(self.processor, "unreached", None)
            if unreached is not None:
                unreached(target)
                return
        self.processor.process(target, stats)


def _twin(block: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]]:
    """A dense copy of ``block`` (taken before any of its layers is processed), and its module for each of the
    block's modules."""
    try:
        twin = copy.deepcopy(block)
    except Exception as error:  # a block holding something that cannot be copied (a lock, a handle, ...)
        raise PrunekitError(f"asymmetric calibration needs a dense copy of each block, and {type(block).__name__} "
                            f"cannot be copied ({type(error).__name__}: {error}); leave out --asymmetric") from None
    twins = dict(twin.named_modules(remove_duplicate=False))
    return twin, {module: twins[name] for name, module in block.named_modules(remove_duplicate=False)}


def _run_block_layerwise(block: nn.Module, index: int, inputs: BlockInputs, targets: list[Target],
                         processor: _Processing) -> list[torch.Tensor]:
    """Run the calibration batches through ``block`` as coroutines that pause before each target, which is
    processed once every batch has reached it. With a twin stream (``inputs.reference_hidden``), a dense copy of
    the block runs the dense model's batches in step, and each target's statistics pair both inputs; its
    outputs become the twin stream's next inputs."""
    direct = {t.module: t for t in targets if not t.routed}
    routed = _routed_groups(targets)
    twin, twin_of = _twin(block) if inputs.reference_hidden is not None else (None, {})

    def pause(module, args):
        current = greenlet.getcurrent()
        if current.parent is not None:  # a batch's coroutine, not the stage passes run from the driver
            current.parent.switch(_Arrival(module, args[0]))

    def pause_routed(module, args, kwargs):
        current = greenlet.getcurrent()
        if current.parent is not None:
            current.parent.switch(_Arrival(module, args, kwargs))

    paused = list(direct) + [twin_of[module] for module in direct if module in twin_of]
    paused_routed = list(routed) + [twin_of[module] for module in routed if module in twin_of]
    handles = [module.register_forward_pre_hook(pause) for module in paused]
    handles += [module.register_forward_pre_hook(pause_routed, with_kwargs=True) for module in paused_routed]
    batches = range(len(inputs.hidden))
    runners = [greenlet.greenlet(lambda b=b: inputs.call(block, index, b)) for b in batches]
    twin_runners = ([greenlet.greenlet(lambda b=b: inputs.call_reference(twin, index, b)) for b in batches]
                    if twin is not None else [])
    try:
        events, twin_events = [], []
        for batch in batches:
            events.append(runners[batch].switch())
            # The running block holds its input for as long as it needs it; the list would keep
            # the whole calibration set's block inputs alive until the block ends.
            inputs.hidden[batch] = None
            if twin is not None:
                twin_events.append(twin_runners[batch].switch())
                inputs.reference_hidden[batch] = None
        processed: set[nn.Module] = set()
        shared: tuple[type | None, LayerStatistics | None, list[torch.Tensor]] | None = None
        while True:
            arrived = [isinstance(event, _Arrival) for event in events]
            module = events[0].module if arrived[0] else None
            if twin is not None and any(
                    (event.module is not twin_of.get(module)) if isinstance(event, _Arrival) else module is not None
                    for event in twin_events):
                raise PrunekitError(f"the dense and the pruned model took different paths through block {index}; "
                                    "leave out --asymmetric for this model")
            if not any(arrived):
                if twin is not None:
                    inputs.reference_hidden = twin_events
                return events
            if not all(arrived) or any(event.module is not module for event in events):
                raise PrunekitError("calibration batches took different paths through a block; "
                                    "use --sequential block for this model")
            if module in processed:
                name = direct[module].name if module in direct else type(module).__name__
                raise PrunekitError(f"layer {name} runs twice in one forward pass; use --sequential block for this model")
            if module in routed:
                _process_routed(module, routed[module], [(e.inputs, e.kwargs) for e in events], processor)
                shared = None
            else:
                target = direct[module]
                xs = [event.inputs for event in events]
                dense_xs = [event.inputs for event in twin_events]
                cls = processor.statistics(target)
                # Layers fed the very same tensors (q/k/v, gate/up) share one set of statistics.
                if shared is not None and shared[0] is cls and all(a is b for a, b in zip(xs, shared[2])):
                    stats = shared[1]
                else:
                    stats = _new_stats(processor, target)
                    if stats is not None:
                        _add_batches(stats, xs, dense_xs)
                    shared = (cls, stats, xs)
                processor.handle(target, stats)
                del xs, dense_xs
            processed.add(module)
            del events, twin_events
            events = [runner.switch() for runner in runners]
            twin_events = [runner.switch() for runner in twin_runners]
    finally:
        for handle in handles:
            handle.remove()
        for runner in runners + twin_runners:
            if not runner.dead:
                runner.throw(greenlet.GreenletExit)


def _add_batches(stats: LayerStatistics, xs: list[torch.Tensor], dense_xs: list[torch.Tensor]) -> None:
    """Every batch's inputs, paired with the dense model's where there is a twin stream."""
    if dense_xs and not isinstance(stats, TwinInputHessian):
        raise PrunekitError(f"asymmetric calibration needs paired statistics, not {type(stats).__name__}")
    if dense_xs:
        for x, dense in zip(xs, dense_xs):
            stats.add_pair(x, dense)
    else:
        for x in xs:
            stats.add(x)


def _collect_block(block: nn.Module, index: int, inputs: BlockInputs, targets: list[Target],
                   processor: _Processing) -> tuple[list[Target], dict[Target, LayerStatistics | None], list[torch.Tensor]]:
    direct = {t.module: t for t in targets if not t.routed}
    routed = [t for t in targets if t.routed]
    order: list[Target] = []
    stats: dict[Target, LayerStatistics | None] = {}
    by_module: dict[nn.Module, LayerStatistics | None] = {}
    follows: set[nn.Module] = set()  # layers whose input is the previous layer's input
    state: dict[str, object] = {"batch": 0, "last": None}

    def collect(module, args):
        x = args[0]
        last = state["last"]
        target = direct[module]
        if state["batch"] == 0:
            if module in by_module:
                raise PrunekitError(f"layer {target.name} runs twice in one forward pass; not supported")
            order.append(target)
            cls = processor.statistics(target)
            if last is not None and last[0] is x and type(last[1]) is cls and cls is not None:
                by_module[module] = last[1]
                follows.add(module)
                return None
            by_module[module] = _new_stats(processor, target)
        elif module in follows:
            if last is None or last[0] is not x:
                raise PrunekitError("calibration batches took different paths through a block")
            return None
        if by_module.get(module) is not None:
            by_module[module].add(x)
        state["last"] = (x, by_module.get(module))
        return None

    handles = [module.register_forward_pre_hook(collect) for module in direct]
    routed_stats = {t: _new_stats(processor, t) for t in routed}
    outputs = []
    try:
        for batch in range(len(inputs.hidden)):
            state["batch"], state["last"] = batch, None
            if routed:
                with _eager_experts(routed), _RoutedRecorder(routed_stats):
                    outputs.append(inputs.call(block, index, batch))
            else:
                outputs.append(inputs.call(block, index, batch))
    finally:
        for handle in handles:
            handle.remove()
    for target in order:
        stats[target] = by_module[target.module]
    order += routed
    stats.update(routed_stats)
    return order, stats, outputs


StatsReducer = Callable[[LayerStatistics], None]


class SequentialCalibration:
    """The calibration activations as they travel block by block, and the steps that move them.

    ``run_sequential`` drives it over an in-memory model; the streaming pipeline drives it over
    blocks materialised one at a time from disk. ``reduce`` (e.g. an all-reduce across processes)
    sees every statistic once it is complete on this process and before it is used.
    """

    def __init__(self, structure: BlockStructure, processor: LayerProcessor | None, mode: Mode = "layer",
                 reduce: StatsReducer | None = None, twin: bool = False):
        if mode not in ("layer", "block", "dense"):
            raise PrunekitError(f"unknown sequential mode '{mode}'; choose layer, block or dense")
        if twin and mode != "layer":
            raise PrunekitError("asymmetric calibration pairs every layer's inputs with the dense model's, layer by "
                                "layer; use --sequential layer")
        self.structure, self.processor, self.mode = structure, processor, mode
        self.reduce = reduce
        self.twin = twin  # carry the dense model's activations beside the pruned model's (asymmetric calibration)
        self.inputs: BlockInputs | None = None
        self.windows: torch.Tensor | None = None
        self.batch_size = 1

    def attach(self, model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
        """The model and calibration batches the activations belong to (set by ``capture``, or on resuming)."""
        self.model, self.windows, self.batch_size = model, windows, batch_size

    def capture(self, model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
        self.attach(model, windows, batch_size)
        self.inputs = capture_block_inputs(model, self.structure, windows, batch_size)
        _check_finite(self.inputs.hidden, "before the first block")
        if self.twin:  # the streams part at the first pruned layer; until then they are the same tensors
            self.inputs.reference_hidden = list(self.inputs.hidden)

    @torch.no_grad()
    def run_block(self, index: int, block: nn.Module, targets: list[Target]) -> None:
        """Process the block's targets and replace the activations by the block's outputs."""
        assert self.inputs is not None, "capture() first"
        inputs = self.inputs
        batches = range(len(inputs.hidden))
        if self.twin and inputs.reference_hidden is None:
            raise PrunekitError("the saved calibration activations carry no dense twin stream; resume without "
                                "--asymmetric, or start again")
        if not targets:
            if inputs.probe_hidden is not None:
                inputs.probe_hidden = inputs.call_probe(block, index)
            if self.twin:  # a block with nothing to process is still dense: the same block serves both streams
                inputs.reference_hidden = [inputs.call_reference(block, index, b) for b in batches]
            outputs = [inputs.call(block, index, b) for b in batches]
        else:
            targets = _how_reached(block, index, inputs, targets)
            processor = _Processing(self.processor, self.reduce)
            if self.mode == "layer":
                outputs = _run_block_layerwise(block, index, inputs, targets, processor)
            else:
                order, stats, outputs = _collect_block(block, index, inputs, targets, processor)
                for target in order:
                    processor.handle(target, stats[target])
                del stats
                if self.mode == "block":
                    outputs = [inputs.call(block, index, b) for b in batches]
            missed = [t.name for t in targets if t not in processor.done]
            if missed:
                raise PrunekitError(f"the calibration data never reached {missed[0]}"
                                    + (f" (and {len(missed) - 1} more)" if len(missed) > 1 else "")
                                    + f" in block {index}; leave it out with --exclude")
        _check_finite(outputs, f"after block {index}")
        if self.twin:
            _check_finite(inputs.reference_hidden, f"after block {index} of the dense model")
        inputs.hidden = outputs
        release_freed_memory()

    def batches(self) -> list[torch.Tensor]:
        assert self.windows is not None
        return [self.windows[start:start + self.batch_size] for start in range(0, self.windows.shape[0], self.batch_size)]

    @torch.no_grad()
    def head_inputs(self, dense: bool = False) -> list[torch.Tensor]:
        """What the head receives for each batch, computed by the model's own code after the last block (from the
        dense twin stream with ``dense``)."""
        assert self.inputs is not None
        found: list[torch.Tensor] = []
        streams = self.inputs.reference_hidden if dense else self.inputs.hidden
        assert streams is not None
        for batch, hidden in zip(self.batches(), streams):
            replay_after_blocks(self.model, self.structure, batch.to(hidden.device), hidden,
                                self.inputs.template, on_head=found.append, stop_at_head=True)
        if len(found) != len(self.inputs.hidden):
            raise PrunekitError(f"{type(self.model).__name__}'s forward does not reach its head; the head cannot be "
                                "calibrated")
        return found

    @torch.no_grad()
    def run_head(self, targets: list[Target]) -> None:
        """Targets after the blocks (the LM head) see what the model feeds its head."""
        processor = _Processing(self.processor, self.reduce)
        head_inputs = self.head_inputs()
        dense_inputs = self.head_inputs(dense=True) if self.twin else []
        for target in targets:
            stats = _new_stats(processor, target)
            if stats is not None:
                _add_batches(stats, head_inputs, dense_inputs)
            processor.handle(target, stats)

    @torch.no_grad()
    def logits(self) -> list[torch.Tensor]:
        """The model's output logits for each batch, from the activations after the last block."""
        assert self.inputs is not None
        result = []
        for batch, hidden in zip(self.batches(), self.inputs.hidden):
            output = replay_after_blocks(self.model, self.structure, batch.to(hidden.device), hidden,
                                         self.inputs.template)
            result.append(output.logits if hasattr(output, "logits") else output[0])
        return result


def group_by_block(targets: list[Target]) -> dict[int, list[Target]]:
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        if target.block is None:
            raise ValueError(f"{target.name} is outside the blocks; it needs no calibration pass")
        by_block.setdefault(target.block, []).append(target)
    return by_block


def run_sequential(model: nn.Module, structure: BlockStructure, windows: torch.Tensor, targets: list[Target],
                   processor: LayerProcessor, mode: Mode = "layer", batch_size: int = 4,
                   description: str = "Calibrating", reduce: StatsReducer | None = None, twin: bool = False) -> None:
    """Feed ``windows`` block by block, calling ``processor.process`` on every target as described above.

    ``mode="dense"`` only collects: statistics of every layer of the unmodified model, outputs
    propagated from the same pass (the processor must not change weights).
    """
    calibration = SequentialCalibration(structure, processor, mode, reduce, twin)
    by_block = group_by_block(targets)
    blocks = structure.blocks()
    last_block = max((b for b in by_block if b != HEAD), default=-1)
    stop = len(blocks) if HEAD in by_block else last_block + 1
    calibration.capture(model, windows, batch_size)
    with progress_bar(description, stop) as bar:
        for index in range(stop):
            bar.describe(f"{description} block {index + 1}/{len(blocks)}")
            calibration.run_block(index, blocks[index], by_block.get(index, []))
            bar.advance()
    if HEAD in by_block:
        calibration.run_head(by_block[HEAD])


__all__ = ["HEAD", "BlockInputs", "LayerProcessor", "Mode", "SequentialCalibration", "StatsReducer", "Target",
           "group_by_block", "run_sequential"]

"""What a model costs, counted one way for every dimension: parameters, FLOPs, time.

- parameters: unique tensors, so a tied embedding and head count once (``count_parameters``);
- FLOPs of one call, from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as
  two; ``count_macs`` is half of it). On CPU, scaled-dot-product attention runs as a fused kernel
  the counter has no formula for, so its cost is added with the counter's own attention formula:
  the count is the same on every device;
- time: calls timed in alternation (``time_alternating``), so that compared variants (two models,
  a patch on and off) see the same machine; reported as medians.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``, each tensor once (a head tied to the embedding is one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor once (a head tied to the embedding is not counted twice)."""
    return sum(p.numel() for p in unique_parameters(model))


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory, each tensor once."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS: dict = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``run`` (a multiply-add counts as two), under inference mode."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        run()
    return int(counter.get_total_flops())


def forward(model: nn.Module, inputs: tuple | dict) -> Callable[[], Any]:
    """One forward pass of ``model`` on ``inputs`` (positional arguments as a tuple, keywords as a dict)."""
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    return lambda: model(*args, **kwargs)


def count_macs(model: nn.Module, inputs: tuple | dict) -> int:
    """Multiply-accumulates of one forward pass: half the FLOPs ``count_flops`` finds."""
    return count_flops(forward(model, inputs)) // 2


def time_alternating(calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 0,
                     before: Mapping[str, Callable[[], Any]] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of ``repeats`` timed calls of each of ``calls``, after ``warmup`` untimed rounds.

    Every round calls each once; the timed rounds reverse the order every other round (ABBA), so a drift of the
    machine (clock frequency, caches, a neighbour's load) falls on every variant alike: on a shared
    machine the same pass drifts by tens of percent over minutes, and medians taken minutes apart
    measure that drift as much as the difference. ``before[name]``, when given, runs untimed just
    before each call of ``name`` (installing or removing a patch). Runs under inference mode.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be positive and warmup non-negative")
    names = list(calls)
    before = before or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                if name in before:
                    before[name]()
                calls[name]()
        for index in range(repeats):
            for name in (names if index % 2 == 0 else reversed(names)):
                if name in before:
                    before[name]()
                begin = clock()
                calls[name]()
                times[name].append(clock() - begin)
    return times


@dataclass
class Throughput:
    batch_size: int
    items_per_second: float  # batch size / median seconds per batch
    median_seconds: float
    seconds: list[float]
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_throughput(run: Callable[[], Any], batch_size: int, warmup: int = 3, repeats: int = 10,
                       clock: Callable[[], float] = time.perf_counter) -> Throughput:
    """Time ``run`` (one pass over a batch of ``batch_size`` items): the median of ``repeats`` timed calls
    after ``warmup`` untimed ones."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    seconds = time_alternating({"run": run}, repeats, warmup, clock=clock)["run"]
    median = statistics.median(seconds)
    return Throughput(batch_size=batch_size, items_per_second=batch_size / median, median_seconds=median,
                      seconds=seconds, warmup=warmup)


@dataclass
class PairedThroughput:
    """A pass timed with a change (a patch) on and off in alternation, so both see the same machine."""

    batch_size: int
    items_per_second: float  # changed: batch size / median seconds per batch
    baseline_items_per_second: float
    speedup: float  # median unchanged seconds / median changed seconds
    seconds: list[float]
    baseline_seconds: list[float]
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_paired(run: Callable[[], Any], batch_size: int, change_on: Callable[[], Any],
                   change_off: Callable[[], Any], warmup: int = 3, repeats: int = 10,
                   clock: Callable[[], float] = time.perf_counter) -> PairedThroughput:
    """Time ``run`` with a change on and off in alternating pairs (``time_alternating``), ``repeats`` pairs
    after ``warmup`` untimed ones; the change is left on."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    try:
        times = time_alternating({"on": run, "off": run}, repeats, warmup, before={"on": change_on, "off": change_off},
                                 clock=clock)
    finally:
        change_on()
    median, base = statistics.median(times["on"]), statistics.median(times["off"])
    return PairedThroughput(batch_size=batch_size, items_per_second=batch_size / median,
                            baseline_items_per_second=batch_size / base, speedup=base / median,
                            seconds=times["on"], baseline_seconds=times["off"], warmup=warmup)


def machine_load() -> float | None:
    """The one-minute load average: timings taken while it exceeds the core count are suspect."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None

"""Speed and cost of a forward pass: throughput (warm-up, median of timed runs) and FLOPs.

FLOPs come from ``torch.utils.flop_counter``; on CPU, scaled-dot-product attention runs as a
fused kernel the counter does not know, so its cost is added with the counter's own formula for
attention. Everything a method computes to choose tokens (similarities, PageRank) is counted too.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


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
                       min_seconds: float = 0.0) -> Throughput:
    """Time ``run`` (one forward pass over a batch of ``batch_size`` items) after ``warmup`` untimed
    calls; ``repeats`` timed calls, more if they have not yet lasted ``min_seconds``."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be positive and warmup non-negative")
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - started < min_seconds:
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    return Throughput(batch_size=batch_size, items_per_second=batch_size / median, median_seconds=median,
                      seconds=times, warmup=warmup)


@dataclass
class PairedThroughput:
    """The patched and the unpatched model timed in alternation, so both see the same machine."""

    batch_size: int
    items_per_second: float  # patched: batch size / median seconds per batch
    baseline_items_per_second: float
    speedup: float  # median unpatched seconds / median patched seconds
    seconds: list[float]
    baseline_seconds: list[float]
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_paired(run: Callable[[], Any], batch_size: int, patch_on: Callable[[], Any], patch_off: Callable[[], Any],
                   warmup: int = 3, repeats: int = 10, clock: Callable[[], float] = time.perf_counter) -> PairedThroughput:
    """Time ``run`` with the patch on and off in alternating pairs (ABBA order), ``repeats`` pairs after
    ``warmup`` untimed ones; the patch is left on.

    On a shared machine the speed of the same pass drifts by tens of percent over minutes; a speed-up
    from two medians taken minutes apart measures that drift as much as the method. Alternating
    the two within each pair exposes both to the same load, and the ABBA order cancels a trend
    within a pair.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be positive and warmup non-negative")
    patched: list[float] = []
    unpatched: list[float] = []

    def timed(on: bool, into: list[float] | None) -> None:
        (patch_on if on else patch_off)()
        begin = clock()
        run()
        if into is not None:
            into.append(clock() - begin)

    try:
        with torch.inference_mode():
            for index in range(warmup + repeats):
                first_on = index % 2 == 0
                keep = index >= warmup
                for on in (first_on, not first_on):
                    timed(on, (patched if on else unpatched) if keep else None)
    finally:
        patch_on()
    median, base = statistics.median(patched), statistics.median(unpatched)
    return PairedThroughput(batch_size=batch_size, items_per_second=batch_size / median,
                            baseline_items_per_second=batch_size / base, speedup=base / median,
                            seconds=patched, baseline_seconds=unpatched, warmup=warmup)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``run`` (a multiply-add counts as two)."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        run()
    return int(counter.get_total_flops())


def machine_load() -> float | None:
    """The one-minute load average: timings taken while it exceeds the core count are suspect."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None

"""What shrinking bought, measured the same way before and after.

Parameters, MACs and timings are counted by ``prunekit.evaluate.measure``, the one place every
dimension counts them; this module runs them on a shrunk model and its original:

- parameters (unique tensors: a tied embedding counts once);
- MACs of one forward pass, from ``torch.utils.flop_counter`` (FLOPs / 2, attention included on CPU too);
- CPU latency and throughput at each batch size: warm-up rounds, then the median of ``runs`` timed
  forward passes under ``torch.inference_mode`` with a fixed thread count; models compared with each
  other are timed side by side, their passes alternating (``measure_side_by_side``);
- peak memory of inference at the largest batch, in a fresh process that holds only this model
  (``prunekit.structure.peak_memory``; optional, it costs a process start per model);
- size on disk of the saved weights (measured by the caller after saving);
- quality: perplexity, accuracy or embedding fidelity (also by the caller).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_macs, count_parameters, forward, model_bytes, time_alternating
from prunekit.structure.peak_memory import inference_peak


@dataclass
class SpeedProtocol:
    batch_sizes: tuple[int, ...] = (1, 8)
    runs: int = 5
    warmup: int = 2
    threads: int | None = 2
    seq_len: int = 128  # tokens per sequence for language models

    def describe(self) -> str:
        return (f"median of {self.runs} timed forward passes after {self.warmup} warm-up passes, "
                f"torch.inference_mode, {self.threads or torch.get_num_threads()} threads"
                + (f", sequences of {self.seq_len} tokens" if self.seq_len else ""))


@dataclass
class Measurement:
    parameters: int
    macs: int
    latency_ms: dict[int, float] = field(default_factory=dict)
    throughput: dict[int, float] = field(default_factory=dict)  # items (tokens or images) per second
    unit: str = "items"
    model_bytes: int = 0
    memory: dict | None = None  # PeakMemory.to_dict() of the largest batch, when measured

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        data["throughput"] = {str(k): v for k, v in self.throughput.items()}
        return data


def measure(model: nn.Module, make_inputs: Callable[[int], tuple | dict], items_per_sample: int = 1,
            protocol: SpeedProtocol | None = None, unit: str = "items", memory: bool = False) -> Measurement:
    """``make_inputs(batch)`` returns one batch; ``items_per_sample`` (tokens per sequence) scales throughput.
    ``memory`` adds the peak inference memory at the largest batch, measured in a fresh process."""
    return measure_side_by_side({"model": model}, make_inputs, items_per_sample, protocol, unit, memory)["model"]


def measure_side_by_side(models: Mapping[str, nn.Module], make_inputs: Callable[[int], tuple | dict],
                         items_per_sample: int = 1, protocol: SpeedProtocol | None = None, unit: str = "items",
                         memory: bool = False) -> dict[str, Measurement]:
    """``measure`` for several models at once, their timed passes interleaved (``time_alternating``):
    the speed ratio of a pruned model to its original is only trustworthy when both were timed together."""
    protocol = protocol or SpeedProtocol()
    previous_threads = torch.get_num_threads()
    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    try:
        results = {name: Measurement(count_parameters(model), count_macs(model, make_inputs(1)), unit=unit,
                                     model_bytes=model_bytes(model)) for name, model in models.items()}
        for batch in protocol.batch_sizes:
            inputs = make_inputs(batch)
            times = time_alternating({name: forward(model, inputs) for name, model in models.items()},
                                     protocol.runs, protocol.warmup)
            for name, result in results.items():
                median = statistics.median(times[name])
                result.latency_ms[batch] = median * 1000
                result.throughput[batch] = batch * items_per_sample / median
        if memory:
            largest = max(protocol.batch_sizes)
            for name, result in results.items():
                try:
                    result.memory = inference_peak(models[name], make_inputs(largest), largest, protocol.threads).to_dict()
                except PrunekitError as exc:  # a measurement that cannot be taken must not throw away the pruning
                    result.memory = {"batch": largest, "error": str(exc)}
    finally:
        torch.set_num_threads(previous_threads)
        for name, model in models.items():
            model.train(modes[name])
    return results


def lm_inputs(seq_len: int, vocab_size: int, seed: int = 0) -> Callable[[int], dict]:
    def make(batch: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=generator), "use_cache": False}
    return make


def image_inputs(shape: tuple[int, ...], seed: int = 0) -> Callable[[int], tuple]:
    def make(batch: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, *shape, generator=generator),)
    return make


def compare(before: Measurement, after: Measurement) -> dict:
    """Ratios after/before (speedup = throughput after / before)."""
    return {
        "parameters": after.parameters / before.parameters,
        "macs": after.macs / before.macs if before.macs else None,
        "speedup": {str(b): after.throughput[b] / before.throughput[b] for b in before.throughput if b in after.throughput},
        "latency": {str(b): after.latency_ms[b] / before.latency_ms[b] for b in before.latency_ms if b in after.latency_ms},
    }

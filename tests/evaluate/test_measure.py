"""Parameters, FLOPs and timings, counted in one place for every dimension (prunekit.evaluate.measure)."""

from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.evaluate.measure import (count_flops, count_macs, count_parameters, measure_paired, measure_throughput,
                                       model_bytes, time_alternating)


def test_flops_of_a_linear_layer_are_exact():
    layer = nn.Linear(8, 4)
    inputs = torch.randn(3, 8)
    assert count_flops(lambda: layer(inputs)) == 2 * 3 * 8 * 4  # a multiply-add is two
    assert count_macs(layer, (inputs,)) == 3 * 8 * 4
    assert count_macs(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), (inputs,)) == 3 * (8 * 16 + 16 * 2)


def test_cpu_attention_is_counted_as_on_any_device():
    q = torch.randn(2, 3, 10, 16)
    # q k^T and (attention) v: 2 matmuls of 10 × 10 × 16 multiply-adds per head and sample
    assert count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 2 * 3 * 10 * 10 * 16


def test_keyword_inputs_reach_the_forward_pass():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 7)

        def forward(self, x=None):
            return self.proj(x)

    assert count_macs(Keywords(), {"x": torch.randn(4, 5)}) == 4 * 5 * 7


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(width))


def test_tied_weights_are_counted_once():
    model = TiedLM()
    assert count_parameters(model) == 50 * 6
    assert model_bytes(model) == (50 * 6 + 6) * 4  # the buffer counts in memory, the tied head does not
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert count_parameters(model) == 2 * 50 * 6


def test_throughput_is_the_batch_over_the_median_time():
    calls = []
    result = measure_throughput(lambda: calls.append(1), batch_size=8, warmup=2, repeats=5)
    assert len(calls) == 7 and len(result.seconds) == 5
    assert result.items_per_second == 8 / result.median_seconds
    assert sorted(result.seconds)[2] == result.median_seconds


def test_variants_alternate_in_abba_order_and_warmup_rounds_are_untimed():
    order, now = [], [0.0]

    def call(name, seconds):
        def run():
            order.append(name)
            now[0] += seconds
        return run

    times = time_alternating({"a": call("a", 1.0), "b": call("b", 3.0)}, repeats=3, warmup=1, clock=lambda: now[0])
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]}
    with pytest.raises(ValueError):
        time_alternating({"a": call("a", 1.0)}, repeats=0)


def test_paired_timing_alternates_and_cancels_a_drifting_machine():
    """A machine that slows down steadily: paired ABBA timing still finds the true 2x speed-up."""
    now = [0.0]
    state = {"on": False, "passes": 0}
    order = []

    def run():
        state["passes"] += 1
        drift = 1.0 + 0.05 * state["passes"]  # every pass 5 % slower than the first
        now[0] += (1.0 if state["on"] else 2.0) * drift
        order.append(state["on"])

    result = measure_paired(run, batch_size=4, change_on=lambda: state.update(on=True),
                            change_off=lambda: state.update(on=False), warmup=1, repeats=6, clock=lambda: now[0])
    assert order == [True, False] + [True, False, False, True] * 3
    assert state["on"]  # the change is left on
    assert len(result.seconds) == len(result.baseline_seconds) == 6
    assert abs(result.speedup - 2.0) < 0.12
    median = (sorted(result.seconds)[2] + sorted(result.seconds)[3]) / 2
    assert result.items_per_second == pytest.approx(4 / median)


def test_evaluate_imports_no_dimension():
    """evaluate sits below the dimensions (they all report through it), so it may import only core, io and
    models; otherwise a dimension and evaluate would import each other."""
    from prunekit.tools.check_imports import violations

    allowed = {"evaluate": frozenset({"core", "io", "models", "evaluate"})}
    found = violations(Path(prunekit.__file__).parent, allowed)
    assert [f"{v.path}:{v.line}: {v.importer} imports {v.imported}" for v in found] == []

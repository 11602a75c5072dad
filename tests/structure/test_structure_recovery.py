"""Recovery fine-tuning and measurement."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.measure import SpeedProtocol, count_macs, count_parameters, measure, measure_side_by_side
from prunekit.training.recovery import FineTunePlan, distillation_loss, recover, recover_classifier
from structure_helpers import tiny_llama

WINDOWS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _kl(student, teacher) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(input_ids=WINDOWS).logits, teacher(input_ids=WINDOWS).logits))


def test_distillation_moves_the_student_towards_the_teacher():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    prune_structure(student, 0.3, example_inputs=lm_example_inputs(), importance="l2",
                    calibration=lm_calibration(WINDOWS), allocation={"round_to": 1})
    before = _kl(student, teacher)
    result = recover(student, WINDOWS, teacher=teacher, objective="distill", steps=30, lr=3e-3, batch_size=2)
    assert result.steps == 30 and result.tokens == 30 * 2 * 24 and len(result.losses) == 30
    assert result.objective == "distill" and result.update == "full" and result.layers == 0
    embedding = student.model.embed_tokens.weight.numel()
    assert result.trainable_parameters == sum(p.numel() for p in student.parameters()) - embedding  # tied: frozen
    assert _kl(student, teacher) < 0.7 * before
    assert not student.training and all(p.grad is None for p in student.parameters())
    assert student.model.embed_tokens.weight.requires_grad  # requires_grad restored after freezing it


def test_plain_recovery_lowers_the_language_model_loss():
    student = tiny_llama()
    with torch.no_grad():
        before = float(student(input_ids=WINDOWS, labels=WINDOWS).loss)
    recover(student, WINDOWS, steps=20, lr=3e-3, batch_size=4, train_embeddings=True)
    with torch.no_grad():
        assert float(student(input_ids=WINDOWS, labels=WINDOWS).loss) < before - 0.5


def test_train_only_leaves_every_other_parameter_untouched():
    student = tiny_llama()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    recover(student, WINDOWS, steps=5, lr=3e-3, train_only=("mlp.",))
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("mlp." in name for name in changed)
    assert {name for name in before if "mlp." in name} == changed
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(PrunekitError, match="no parameter left to train"):
        recover(student, WINDOWS, steps=1, train_only=("no-such-module",))


def test_the_time_budget_is_never_overrun(monkeypatch):
    import types

    from prunekit.training import recovery

    clock = iter(0.25 * i for i in range(1000))  # every reading of the clock is a quarter second later
    monkeypatch.setattr(recovery, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    result = recover(tiny_llama(), WINDOWS, FineTunePlan(seconds=1.2, lr=1e-3))
    # After 3 steps the clock reads 1.0 s at 1/3 s a step: a fourth would end past 1.2 s, so none starts
    # (checking only the elapsed time, a fourth would start at 1.0 s and end at 1.25 s).
    assert result.steps == 3


def test_recovery_rejects_bad_budgets_and_modes():
    model = tiny_llama()
    with pytest.raises(PrunekitError, match="needs the unpruned teacher"):
        recover(model, WINDOWS, objective="distill", steps=1)
    with pytest.raises(PrunekitError, match="budget"):
        recover(model, WINDOWS, lr=1e-3)
    with pytest.raises(PrunekitError, match="unknown recovery objective 'sgd'"):
        recover(model, WINDOWS, objective="sgd", steps=1)
    with pytest.raises(PrunekitError, match="unknown recovery setting 'max_steps'"):
        recover(model, WINDOWS, max_steps=1)


def test_classifier_recovery_plain_and_distilled():
    torch.manual_seed(0)
    inputs = torch.randn(256, 10)
    labels = (inputs[:, 0] > 0).long()
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    student = copy.deepcopy(teacher)
    plain = recover_classifier(student, inputs, labels, objective="plain", epochs=3, lr=0.1, batch_size=32)
    assert plain.losses[-1] < plain.losses[0]
    distilled = recover_classifier(copy.deepcopy(teacher), inputs, labels, teacher=teacher, objective="distill", epochs=3,
                                   lr=0.1, batch_size=32)
    assert distilled.steps == 24 and distilled.losses[-1] < distilled.losses[0]


def test_measurement_counts_and_times():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    assert count_parameters(model) == 16 * 32 + 32 + 32 * 4 + 4
    assert count_macs(model, (torch.randn(3, 16),)) == 3 * (16 * 32 + 32 * 4)
    result = measure(model, lambda batch: (torch.randn(batch, 16),), items_per_sample=1,
                     protocol=SpeedProtocol(batch_sizes=(1, 8), runs=5, warmup=1, threads=1, seq_len=0))
    assert result.macs == 16 * 32 + 32 * 4 and set(result.latency_ms) == {1, 8}
    for batch in (1, 8):
        assert result.throughput[batch] == pytest.approx(batch / (result.latency_ms[batch] / 1000))
    assert result.memory is None and result.model_bytes == count_parameters(model) * 4


class _Sleeper(nn.Module):
    """A model whose forward pass takes a known time and says when it ran."""

    def __init__(self, name: str, seconds: float, log: list[str]):
        super().__init__()
        self.name, self.seconds, self.log = name, seconds, log
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.log.append(self.name)
        time.sleep(self.seconds)
        return x * self.scale


def test_models_compared_are_timed_side_by_side_in_abba_order():
    log: list[str] = []
    models = {"before": _Sleeper("before", 0.03, log).eval(), "after": _Sleeper("after", 0.01, log)}
    models["after"].train()
    results = measure_side_by_side(models, lambda batch: (torch.randn(batch, 4),),
                                   protocol=SpeedProtocol(batch_sizes=(2,), runs=4, warmup=1, threads=1, seq_len=0))
    # one pass each to count MACs, one warm-up each, then the timed passes alternate AB, BA, AB, BA
    assert log == ["before", "after"] * 2 + ["before", "after", "after", "before"] * 2
    ratio = results["before"].latency_ms[2] / results["after"].latency_ms[2]
    assert 1.5 < ratio < 6
    assert results["after"].throughput[2] == pytest.approx(2 / (results["after"].latency_ms[2] / 1000))
    assert models["after"].training and not models["before"].training  # modes restored


def test_peak_memory_is_the_models_own_in_a_fresh_process():
    from prunekit.structure.graph import build_graph
    from prunekit.structure.shrink import shrink

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16384), nn.ReLU(), nn.Linear(16384, 4)).eval()
    protocol = SpeedProtocol(batch_sizes=(1, 1024), runs=1, warmup=0, threads=1, seq_len=0)
    make = lambda batch: (torch.randn(batch, 64),)  # noqa: E731
    before = measure(model, make, protocol=protocol, memory=True).memory
    # This process now holds far more than either model; the figures must not see it.
    ballast = torch.ones(64 * 2**20 // 4)
    shrink(build_graph(model, (torch.randn(2, 64),)), {"0": list(range(16384 - 1024))})
    after = measure(model, make, protocol=protocol, memory=True).memory
    del ballast
    assert before["batch"] == after["batch"] == 1024 and "high-water mark" in before["method"]
    # 1024 × 16384 float activations are 64 MiB; at 1024 neurons they are 4 MiB.
    assert before["inference_bytes"] > 48 * 2**20 and after["inference_bytes"] < before["inference_bytes"] / 4
    assert after["loaded_rss_bytes"] < before["loaded_rss_bytes"] + 8 * 2**20  # a fresh process, not this one


def test_peak_memory_that_cannot_be_measured_is_reported_not_fatal():
    model = nn.Sequential(nn.Linear(4, 2))
    model.describe = lambda: "a lambda does not pickle"
    protocol = SpeedProtocol(batch_sizes=(1, 2), runs=1, warmup=0, threads=1, seq_len=0)
    result = measure(model, lambda batch: (torch.randn(batch, 4),), protocol=protocol, memory=True)
    assert result.memory["batch"] == 2 and "the model does not pickle" in result.memory["error"]
    assert set(result.throughput) == {1, 2}

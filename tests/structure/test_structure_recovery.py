"""Recovery fine-tuning and measurement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.measure import SpeedProtocol, count_macs, count_parameters, measure
from prunekit.structure.recovery import distillation_loss, recover_classifier, recover_lm
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
    result = recover_lm(student, WINDOWS, teacher, "distill", max_seconds=None, max_steps=30, lr=3e-3, batch_size=2)
    assert result.steps == 30 and result.tokens == 30 * 2 * 24
    assert _kl(student, teacher) < 0.7 * before
    assert not student.training and all(p.grad is None for p in student.parameters())
    assert student.model.embed_tokens.weight.requires_grad  # requires_grad restored after freezing it


def test_plain_recovery_lowers_the_language_model_loss():
    student = tiny_llama()
    with torch.no_grad():
        before = float(student(input_ids=WINDOWS, labels=WINDOWS).loss)
    recover_lm(student, WINDOWS, None, "plain", max_seconds=None, max_steps=20, lr=3e-3, batch_size=4, train_embeddings=True)
    with torch.no_grad():
        assert float(student(input_ids=WINDOWS, labels=WINDOWS).loss) < before - 0.5


def test_recovery_rejects_bad_budgets_and_modes():
    model = tiny_llama()
    with pytest.raises(PrunekitError, match="needs the unpruned teacher"):
        recover_lm(model, WINDOWS, None, "distill", max_steps=1)
    with pytest.raises(PrunekitError, match="budget"):
        recover_lm(model, WINDOWS, None, "plain", max_seconds=None, max_steps=None)
    with pytest.raises(PrunekitError, match="unknown recovery mode"):
        recover_lm(model, WINDOWS, None, "sgd", max_steps=1)


def test_classifier_recovery_plain_and_distilled():
    torch.manual_seed(0)
    inputs = torch.randn(256, 10)
    labels = (inputs[:, 0] > 0).long()
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    student = copy.deepcopy(teacher)
    plain = recover_classifier(student, inputs, labels, mode="plain", epochs=3, lr=0.1, batch_size=32)
    assert plain.losses[-1] < plain.losses[0]
    distilled = recover_classifier(copy.deepcopy(teacher), inputs, labels, teacher=teacher, mode="distill", epochs=3,
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
    assert result.peak_rss_bytes > 0 and result.model_bytes == count_parameters(model) * 4

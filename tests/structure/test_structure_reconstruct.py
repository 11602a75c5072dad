"""Least-squares reconstruction of the layers that read removed channels."""

from __future__ import annotations

import copy

import pytest
import torch
from structure_helpers import tiny_llama
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structure import classifier_calibration, lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.reconstruct import refit_columns

WINDOWS = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(7))


def _error(weight: torch.Tensor, refit: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ weight.T - x @ refit.T).square().sum())


def test_refit_recovers_removed_channels_that_are_combinations_of_kept_ones():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    x = torch.cat([base, base[:, :2] @ torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)], 1)  # 8 channels
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    removed = torch.tensor([6, 7])
    refit = refit_columns(weight, x.T @ x, removed, damping=1e-9)
    assert torch.equal(refit[:, removed], torch.zeros(5, 2, dtype=torch.float64))
    assert _error(weight, refit, x) < 1e-6 * float((x @ weight.T).square().sum())


def test_refit_beats_zeroing_and_keeps_dtype():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 12, generator=generator) @ torch.randn(12, 12, generator=generator)  # correlated channels
    weight = torch.randn(4, 12, generator=generator)
    removed = torch.tensor([0, 3, 5])
    zeroed = weight.clone()
    zeroed[:, removed] = 0
    refit = refit_columns(weight, x.T @ x, removed)
    assert refit.dtype == weight.dtype and refit.shape == weight.shape
    assert _error(weight, refit, x) < 0.5 * _error(weight, zeroed, x)


def test_damping_is_a_ridge_towards_the_unpruned_weights():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 20, generator=generator, dtype=torch.float64)  # fewer samples than channels: G has rank 6
    weight = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    removed = torch.tensor([2, 9, 15])
    kept = torch.tensor([i for i in range(20) if i not in (2, 9, 15)])
    gram = x.T @ x
    refit = refit_columns(weight, gram, removed, damping=0.3)
    # the closed form of min ‖W X − W'_K X_K‖² + λ ‖W'_K − W_K‖², λ = 0.3 · mean diagonal of G_KK
    lam = 0.3 * gram[kept][:, kept].diagonal().mean()
    g_kk = gram[kept][:, kept] + lam * torch.eye(17, dtype=torch.float64)
    expected = torch.linalg.solve(g_kk, gram[kept] @ weight.T + lam * weight[:, kept].T).T
    torch.testing.assert_close(refit[:, kept], expected)
    # a strong ridge keeps the kept columns (plain zeroing of the removed ones), a weak one fits the data
    strong = refit_columns(weight, gram, removed, damping=100.0)
    assert (strong[:, kept] - weight[:, kept]).abs().max() < 0.05 * weight.abs().max()
    weak = refit_columns(weight, gram, removed, damping=1e-6)
    zeroed = weight.clone()
    zeroed[:, removed] = 0
    assert _error(weight, weak, x) < 1e-3 * _error(weight, zeroed, x)


def test_channels_never_active_keep_their_weights():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(2))
    x[:, 1] = 0
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    refit = refit_columns(weight, x.T @ x, torch.tensor([3]))
    assert torch.equal(refit[:, 1], weight[:, 1])
    assert torch.isfinite(refit).all()


def _output_error(model: nn.Module, reference: nn.Module) -> float:
    with torch.no_grad():
        return float((model(input_ids=WINDOWS).logits - reference(input_ids=WINDOWS).logits).square().mean())


@pytest.mark.parametrize("importance", ["l2", "flap"])
def test_reconstruction_brings_a_shrunk_llama_closer_to_the_original(importance):
    original = tiny_llama(layers=2, hidden=32, intermediate=64)
    errors, shapes = {}, {}
    for reconstruct in (False, True):
        model = copy.deepcopy(original)
        result = prune_structure(model, 0.3, example_inputs=lm_example_inputs(), importance=importance,
                                 granularity="channels,heads", calibration=lm_calibration(WINDOWS),
                                 allocation={"round_to": 1}, reconstruct=reconstruct)
        errors[reconstruct] = _output_error(model, original)
        shapes[reconstruct] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if reconstruct:
            # one consumer per family with removals: o_proj for heads, down_proj for MLP neurons
            families = sum(1 for units in result.plan.removal.values() if len(units))
            assert f"reconstruction refitted {families} layers by least squares on the calibration data" in result.notes
            assert "reconstruct_seconds" in result.seconds
            assert not result.shrink.compensated  # no FLAP bias on top of the refit
    if importance == "l2":  # same plan, same shapes: only the kept weights change (FLAP reserves bias parameters)
        assert shapes[True] == shapes[False]
    assert errors[True] < 0.8 * errors[False]


def test_reconstruction_of_a_classifier_runs_in_one_dense_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    images = torch.randn(256, 10) @ torch.randn(10, 10)
    reference = copy.deepcopy(model)
    errors = {}
    for reconstruct in (False, True):
        candidate = copy.deepcopy(model)
        prune_structure(candidate, 0.4, example_inputs=(images[:2],), importance="l2",
                        calibration=classifier_calibration(images, batch_size=64), allocation={"round_to": 1},
                        reconstruct=reconstruct)
        with torch.no_grad():
            errors[reconstruct] = float((candidate(images) - reference(images)).square().mean())
    assert errors[True] < 0.5 * errors[False]


def test_reconstruction_needs_calibration_and_a_sensible_damping():
    with pytest.raises(PrunekitError, match="reconstruction refits layers on calibration data"):
        prune_structure(tiny_llama(), 0.2, example_inputs=lm_example_inputs(), reconstruct=True)
    with pytest.raises(PrunekitError, match=r"damping must lie in \(0, 100\]"):
        prune_structure(tiny_llama(), 0.2, example_inputs=lm_example_inputs(), reconstruct=True,
                        calibration=lm_calibration(WINDOWS), damping=0)

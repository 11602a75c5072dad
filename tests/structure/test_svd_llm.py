"""SVD-LLM: exact at full rank, optimal in the whitened norm, the ratio kept, saved and reloaded."""

import copy

import pytest
import torch

import prunekit
from prunekit.core.lowrank import FactoredLinear, lowrank_layers, rank_for_fraction, whitened_svd, whitening_factor
from prunekit.structure.saving import save_structured
from prunekit.errors import PrunekitError
from prunekit.structure.shrink_method import get_shrink_method
from tests.conftest import TINY_VOCAB as VOCAB
from tests.conftest import tiny_inputs, tiny_llama



@pytest.mark.parametrize("sequential", ["layer", "dense"])
def test_full_rank_reproduces_every_layer(calibration, sequential):
    model = tiny_llama(vocab=VOCAB)
    reference = copy.deepcopy(model)
    result = get_shrink_method({"name": "svd-llm", "sequential": sequential}).factor(
        model, calibration, 4, lambda out_features, in_features: min(out_features, in_features))
    assert len(result["layers"]) == 14 and all(isinstance(m, FactoredLinear) for m in lowrank_layers(model).values())
    for name, module in lowrank_layers(model).items():
        weight = reference.get_submodule(name).weight
        product = module.lowrank_out.weight @ module.lowrank_in.weight
        assert torch.allclose(product, weight, rtol=1e-4, atol=1e-5), name
    with torch.no_grad():
        assert torch.allclose(model(tiny_inputs()).logits, reference(tiny_inputs()).logits, atol=1e-4)


def test_whitened_truncation_beats_plain_svd_on_the_calibrationtiny_inputs():
    """The point of whitening: at every rank the output error on X is at most plain truncated SVD's."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 16, generator=generator, dtype=torch.float64)
    x = torch.randn(200, 16, generator=generator, dtype=torch.float64) * torch.logspace(-2, 1, 16, dtype=torch.float64)
    svd = whitened_svd(weight, whitening_factor(x.T @ x / 200, 1e-6))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    for rank in range(1, 16):
        left, right = svd.factors(rank, torch.float64)
        whitened = (x @ (weight - left @ right).T).square().sum()
        plain = (x @ (weight - (u[:, :rank] * s[:rank]) @ vh[:rank]).T).square().sum()
        assert whitened <= plain * (1 + 1e-9), rank
        assert float(whitened / 200) == pytest.approx(float(svd.errors[rank]), rel=1e-6)


def test_the_ratio_of_the_model_is_removed(calibration):
    model = tiny_llama(vocab=VOCAB)
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = get_shrink_method("svd-llm").apply(model, calibration, 0.2, 4)
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # At least the ratio, and no more than one rank's parameters of every layer beyond it.
    slack = sum(sum(layer["shape"]) for layer in result["layers"])
    assert 0.2 * before <= before - after <= 0.2 * before + slack
    for layer in result["layers"]:  # every layer keeps the same fraction of its parameters, rounded down to a rank
        assert layer["rank"] == rank_for_fraction(*layer["shape"], 1 - result["linear_ratio"])
    with pytest.raises(PrunekitError, match="smaller ratio"):
        get_shrink_method("svd-llm").apply(tiny_llama(vocab=VOCAB), calibration, 0.9, 4)


def test_saved_and_reloaded_it_gives_identical_outputs(calibration, tmp_path):
    model = tiny_llama(vocab=VOCAB)
    get_shrink_method("svd-llm").apply(model, calibration, 0.2, 4)
    saved = save_structured(model, tmp_path)
    assert not saved.from_pretrained
    loaded = prunekit.load(tmp_path, kind="causal-lm")
    assert set(lowrank_layers(loaded)) == set(lowrank_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(tiny_inputs()).logits, model(tiny_inputs()).logits)


def test_the_second_factor_refit_is_the_least_squares_fit_and_never_worse():
    """For the R the whitened truncation keeps, the refitted L has the least output error on X (no twin: X_d = X)."""
    from prunekit.core.statistics import InputHessian
    from prunekit.structure.methods.svd_llm import refit_second_factor

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 16, generator=generator)
    x = torch.randn(300, 16, generator=generator) * torch.logspace(-2, 1, 16)
    stats = InputHessian(16)
    stats.add(x)
    svd = whitened_svd(weight.double(), whitening_factor(stats.gram_matrix().double() / 300, 0.01))
    for rank in (2, 6, 12):
        left, right = svd.factors(rank, torch.float32)
        refit, relative = refit_second_factor(weight, right, stats, 1e-12)
        error = lambda m: float((x.double() @ (weight - m @ right).double().T).square().sum())  # noqa: E731
        best = torch.linalg.lstsq(x.double() @ right.double().T, x.double() @ weight.double().T).solution.T
        assert error(refit) <= error(left) * (1 + 1e-6)
        torch.testing.assert_close(refit.double(), best, rtol=1e-3, atol=1e-4)
        assert relative == pytest.approx(error(refit) / float((x.double() @ weight.double().T).square().sum()),
                                         rel=1e-4)


def test_the_update_brings_the_factored_model_closer_to_the_dense_one():
    """With enough tokens for the refit (on 8 × 32 tokens it overfits the 128-wide inputs and loses)."""
    calibration = torch.randint(0, VOCAB, (64, 32), generator=torch.Generator().manual_seed(0))
    x = tiny_inputs()
    with torch.no_grad():
        reference = tiny_llama(vocab=VOCAB, layers=4)(x).logits
        errors = {}
        for update in (False, True):
            model = tiny_llama(vocab=VOCAB, layers=4)
            result = get_shrink_method({"name": "svd-llm", "update": update}).apply(model, calibration, 0.2, 4)
            assert result["method"]["update"] is update
            errors[update] = float((model(x).logits - reference).square().mean())
    assert errors[True] < errors[False]

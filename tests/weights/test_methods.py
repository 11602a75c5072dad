"""The three one-shot methods: exact sparsity, valid N:M, and their error ordering on a real layer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.masks import is_valid_nm, pruned_count
from prunekit.core.patterns import SparsityPattern
from prunekit.core.statistics import InputHessian, InputNorms
from prunekit.core.text import TextProtocol, calibration_windows
from prunekit.errors import PrunekitError
from prunekit.weights import get_method

LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj"]


@pytest.fixture(scope="module")
def real_layers(smollm2_dir):
    """Weights of three SmolLM2 layers with their real inputs on 8 × 256 tokens of Wikipedia."""
    from prunekit.models.loading import load_model

    lm = load_model(smollm2_dir, kind="causal-lm")
    windows = calibration_windows(lm.tokenizer, TextProtocol(calibration_samples=8, seq_len=256))
    captured = {}
    handles = [lm.model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name in LAYERS]
    with torch.no_grad():
        for start in range(0, 8, 4):
            lm.model(input_ids=windows[start:start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (lm.model.get_submodule(name).weight.detach().clone(), torch.cat(captured[name])) for name in LAYERS}


def _stats(method, x):
    if method.statistics is None:
        return None
    stats = method.statistics(x.shape[1])
    for chunk in x.split(512):
        stats.add(chunk)
    return stats


def _error(weight, pruned, x):
    return float(torch.linalg.matrix_norm(x @ weight.T - x @ pruned.T))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("layer", LAYERS)
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(real_layers, layer, pattern):
    weight, x = real_layers[layer]
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        method = get_method(name)
        pruned = weight.clone()
        mask = method.prune(pruned, _stats(method, x), 0.5, SparsityPattern.parse(pattern))
        assert torch.all(pruned[~mask] == 0)
        assert int((~mask).sum()) == pruned_count(weight.numel(), 0.5)
        errors[name] = _error(weight, pruned, x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_update_lowers_the_error_of_its_own_mask(real_layers):
    """The OBS update of the remaining weights must beat applying the same mask without it."""
    weight, x = real_layers[LAYERS[2]]
    method = get_method("sparsegpt")
    pruned = weight.clone()
    mask = method.prune(pruned, _stats(method, x), 0.5, SparsityPattern())
    assert not torch.equal(pruned[mask], weight[mask])
    assert _error(weight, pruned, x) < _error(weight, weight * mask, x)


methods = st.sampled_from(["magnitude", "wanda", "sparsegpt"])
patterns = st.sampled_from(["unstructured", "2:4", "4:8", "1:4", "2:8"])


@settings(max_examples=40, deadline=None)
@given(methods, patterns, st.integers(1, 24), st.integers(1, 6), st.floats(0.0, 0.95), st.integers(0, 1000))
def test_exact_sparsity_and_valid_nm(method_name, pattern_text, rows, groups, sparsity, seed):
    pattern = SparsityPattern.parse(pattern_text)
    cols = groups * 8
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    x = torch.randn(3 * cols, cols, generator=generator)
    method = get_method(method_name)
    target = pattern.sparsity if pattern.is_nm else sparsity
    mask = method.prune(weight, _stats(method, x), target, pattern)
    assert torch.all(weight[~mask] == 0)
    if pattern.is_nm:
        assert is_valid_nm(mask, pattern)
        assert int((~mask).sum()) == rows * cols * (pattern.m - pattern.n) // pattern.m
    elif method.per_row:
        assert ((~mask).sum(dim=1) == pruned_count(cols, sparsity)).all()
    else:
        assert int((~mask).sum()) == pruned_count(rows * cols, sparsity)


def test_sparsegpt_settings_are_validated():
    assert get_method({"name": "sparsegpt", "dampening": 0.05, "block_size": 64}).block_size == 64
    with pytest.raises(PrunekitError, match="method sparsegpt: dampening"):
        get_method({"name": "sparsegpt", "dampening": 0})
    with pytest.raises(PrunekitError, match="method wanda has no setting .bogus.; its settings are: none"):
        get_method({"name": "wanda", "bogus": 1})
    with pytest.raises(PrunekitError, match="unknown method 'obs'"):
        get_method("obs")


def test_wanda_score_is_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    stats = InputNorms(4)
    stats.add(torch.tensor([[3.0, 1.0, 0.1, 10.0]]))
    scores = get_method("wanda").scores(weight, stats)
    torch.testing.assert_close(scores, torch.tensor([[3.0, 2.0, 0.3, 5.0]]))
    mask = get_method("wanda").prune(weight, stats, 0.5, SparsityPattern())
    assert mask.tolist() == [[True, False, False, True]]


def test_sparsegpt_handles_dead_inputs():
    x = torch.randn(64, 16)
    x[:, 3] = 0
    stats = InputHessian(16)
    stats.add(x)
    weight = torch.randn(8, 16)
    get_method("sparsegpt").prune(weight, stats, 0.5, SparsityPattern())
    assert torch.all(weight[:, 3] == 0)
    assert torch.isfinite(weight).all()


def _reference_sparsegpt(weight, hessian, sparsity, prune_n, prune_m, block_size=128, damp=0.01):
    """The algorithm as published (column by column, one level of lazy updates), for comparison."""
    W = weight.clone().float()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, columns = W.shape
    pruned_total = 0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(sparsity * rows * i2 + 0.5) - int(sparsity * rows * i1 + 0.5)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            mask1.view(-1)[torch.topk(tmp.flatten(), k, largest=False).indices] = True
            pruned_total += k
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:i + prune_m] ** 2 / torch.diag(Hinv1)[i:i + prune_m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_m - prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_matches_the_published_algorithm(pattern):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 200, generator=generator) @ torch.randn(200, 200, generator=generator)
    weight = torch.randn(48, 200, generator=generator)
    stats = InputHessian(200)
    stats.add(x)
    nm = SparsityPattern.parse(pattern)
    mine = weight.clone()
    get_method({"name": "sparsegpt", "block_size": 64}).prune(mine, stats, 0.5, nm)
    theirs = _reference_sparsegpt(weight, stats.hessian(), 0.5, nm.n, nm.m, block_size=64)
    assert torch.equal(mine == 0, theirs == 0)
    torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_in_place_path_equals_torchs_and_leaves_the_statistics_alone(monkeypatch, pattern):
    import prunekit.weights.methods.sparsegpt as sparsegpt

    generator = torch.Generator().manual_seed(1)
    stats = InputHessian(300)  # wider than one 256-row step of the lending
    stats.add(torch.randn(600, 300, generator=generator) @ torch.randn(300, 300, generator=generator))
    assert stats.upper_only and sparsegpt._lapack is not None
    accumulated = stats.gram.clone()
    weight = torch.randn(40, 300, generator=generator)
    nm = SparsityPattern.parse(pattern)
    in_place = weight.clone()
    mask = get_method("sparsegpt").prune(in_place, stats, 0.5, nm)
    assert torch.equal(stats.gram, accumulated)  # restored bit for bit: q/k/v share these statistics
    again = weight.clone()
    assert torch.equal(get_method("sparsegpt").prune(again, stats, 0.5, nm), mask)
    assert torch.equal(again, in_place)
    monkeypatch.setattr(sparsegpt, "_lapack", None)
    through_torch = weight.clone()
    torch_mask = get_method("sparsegpt").prune(through_torch, stats, 0.5, nm)
    assert (mask == torch_mask).float().mean() > 0.999
    torch.testing.assert_close(in_place, through_torch, rtol=1e-3, atol=1e-3)


def test_sparsegpt_in_place_path_copes_with_lapack_wrappers_that_copy(monkeypatch):
    import numpy as np

    import prunekit.weights.methods.sparsegpt as sparsegpt

    real = sparsegpt._lapack

    class Copying:  # a SciPy build whose wrappers ignore overwrite_a / overwrite_c
        def spotrf(self, a, **options):
            return real.spotrf(np.array(a, order="F", copy=True), **options)

        def spotri(self, c, **options):
            return real.spotri(np.array(c, order="F", copy=True), **options)

    generator = torch.Generator().manual_seed(3)
    stats = InputHessian(64)
    stats.add(torch.randn(200, 64, generator=generator))
    accumulated = stats.gram.clone()
    weight = torch.randn(16, 64, generator=generator)
    pattern = SparsityPattern()
    in_place = weight.clone()
    mask = get_method("sparsegpt").prune(in_place, stats, 0.5, pattern)
    monkeypatch.setattr(sparsegpt, "_lapack", Copying())
    copied = weight.clone()
    assert torch.equal(get_method("sparsegpt").prune(copied, stats, 0.5, pattern), mask)
    assert torch.equal(copied, in_place)
    assert torch.equal(stats.gram, accumulated)


def test_lent_hessian_is_the_scaled_upper_triangle_and_comes_back_intact():
    stats = InputHessian(20)
    stats.add(torch.randn(50, 20, generator=torch.Generator().manual_seed(2)))
    before = stats.gram.clone()
    with stats.lent_hessian(rows_per_step=6) as lent:
        assert lent is stats.gram
        torch.testing.assert_close(lent.triu(), (before * 2 / 50).triu())
        torch.testing.assert_close(lent.tril(-1), before.T.tril(-1))  # the raw sums, mirrored
        lent[torch.ones(20, 20, dtype=torch.bool).triu()] = -3.0  # whatever a factorisation leaves there
    assert torch.equal(stats.gram, before)


@pytest.mark.parametrize("lapack", [True, False])
def test_sparsegpt_refuses_a_hessian_no_dampening_makes_definite(monkeypatch, lapack):
    import prunekit.weights.methods.sparsegpt as sparsegpt

    if not lapack:
        monkeypatch.setattr(sparsegpt, "_lapack", None)
    stats = InputHessian(8)
    stats.gram = -torch.eye(8) * 100  # negative definite: no reasonable dampening rescues it
    stats.upper_only, stats.rows = False, 10
    with pytest.raises(PrunekitError, match="not positive definite even with 1000× dampening"):
        get_method("sparsegpt").prune(torch.randn(4, 8), stats, 0.5, SparsityPattern())

"""ARMOR (A · N:M S · B, block-diagonal A and B): the layer, the fit's guarantees, the pipeline, save → load,
and the CLI."""

import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.core.lowrank import (ArmorLinear, attach_armor, block_diagonal, lowrank_layers, lowrank_parameters,
                                   restore_lowrank)
from prunekit.core.masks import is_valid_nm
from prunekit.core.patterns import SparsityPattern
from prunekit.core.statistics import InputHessian
from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import write_compressed, write_dense
from prunekit.weights.armor import armor_block_size, fit_armor
from prunekit.weights.base import get_method
from prunekit.weights.lowrank import LowRankSettings
from prunekit.weights.pipeline import prune_weights
from tests.conftest import TINY_VOCAB as VOCAB
from tests.conftest import tiny_inputs, tiny_llama

TWO_FOUR = SparsityPattern.parse("2:4")


def _pruned(calibration, method="sparsegpt", budget=0.1, **lowrank):
    model = tiny_llama(vocab=VOCAB)
    result = prune_weights(model, method, pattern="2:4", calibration=calibration,
                           lowrank={"budget": budget, "kind": "armor", **lowrank})
    return model, result


def _layer_problem(seed: int, out_features: int, in_features: int):
    """A random linear with correlated inputs, its statistics, and its SparseGPT 2:4 weight."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features ** 0.5 + torch.eye(in_features)
    inputs = torch.randn(512, in_features, generator=generator) @ mixing
    stats = InputHessian(in_features)
    stats.add(inputs)
    dense = torch.randn(out_features, in_features, generator=generator) * 0.1
    sparse = dense.clone()
    get_method("sparsegpt").prune(sparse, stats, 0.5, TWO_FOUR)
    return dense, sparse, stats, inputs


def _output_error(dense: torch.Tensor, product: torch.Tensor, inputs: torch.Tensor) -> float:
    """``‖(W − M) X‖²_F / n`` from the inputs themselves, in float64 (not through the fit's own code)."""
    return float(((inputs.double() @ (dense.double() - product.double()).T) ** 2).sum() / inputs.shape[0])


def test_the_layer_computes_a_s_b_and_identity_factors_reproduce_the_linear():
    torch.manual_seed(0)
    linear = nn.Linear(8, 12)
    x = torch.randn(3, 5, 8)
    identity = ArmorLinear(8, 12, 4)
    identity.weight, identity.bias = linear.weight, linear.bias
    identity.armor_in = nn.Parameter(torch.eye(4).repeat(2, 1, 1))
    identity.armor_out = nn.Parameter(torch.eye(4).repeat(3, 1, 1))
    with torch.no_grad():
        assert torch.equal(identity(x), linear(x))
        outer, inner = torch.randn(3, 4, 4), torch.randn(2, 4, 4)
        identity.armor_out.copy_(outer)
        identity.armor_in.copy_(inner)
        expected = x @ (block_diagonal(outer) @ linear.weight @ block_diagonal(inner)).T + linear.bias
        assert torch.allclose(identity(x), expected, atol=1e-5)
    with pytest.raises(PrunekitError, match="does not divide"):
        ArmorLinear(8, 12, 5)


def test_block_size_follows_the_budget():
    assert armor_block_size(576, 576, 0.1) == 24  # 28.8 allowed, 24 the largest divisor below
    assert armor_block_size(1536, 576, 0.1) == 32  # divisors of gcd 192
    assert armor_block_size(64, 64, 0.0) == 0
    for out_features, in_features, fraction in [(576, 576, 0.1), (192, 576, 0.05), (1536, 576, 0.2)]:
        block = armor_block_size(out_features, in_features, fraction)
        assert block * (out_features + in_features) <= fraction * out_features * in_features


def test_zero_compression_is_exact(calibration):
    """An unpruned layer has no error to remove: the fit keeps the start, and the model is left unchanged."""
    dense, _, stats, _ = _layer_problem(0, 16, 32)
    fit = fit_armor(dense, dense, stats, block=4, rounds=3, dampening=0.01)
    assert fit.error_start == fit.error == 0.0 and not fit.improved
    model = tiny_llama(vocab=VOCAB)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_weights(model, "magnitude", ratio=0.0, calibration=calibration,
                           lowrank={"budget": 0.1, "kind": "armor"})
    assert not lowrank_layers(model) and result.lowrank["extra_parameters"] == 0
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("seed,shape,block,reselect", [(0, (16, 32), 4, 0), (1, (32, 16), 8, 1), (2, (24, 24), 6, 2),
                                                       (3, (8, 64), 2, 1)])
def test_the_fit_never_has_more_output_error_than_the_method_alone(seed, shape, block, reselect):
    dense, sparse, stats, inputs = _layer_problem(seed, *shape)
    method = get_method("sparsegpt")
    fit = fit_armor(dense, sparse, stats, block, rounds=3, dampening=0.01, reselect=reselect,
                    reprune=lambda weight, statistics: method.prune(weight, statistics, 0.5, TWO_FOUR))
    product = block_diagonal(fit.outer) @ fit.sparse @ block_diagonal(fit.inner)
    plain = _output_error(dense, sparse, inputs)
    assert fit.error <= fit.error_start
    assert _output_error(dense, product, inputs) <= plain * (1 + 1e-5)
    assert fit.improved and _output_error(dense, product, inputs) < 0.95 * plain  # and it does help
    assert is_valid_nm(fit.sparse != 0, TWO_FOUR)
    if not reselect:  # the method's mask kept: only the kept values move
        assert not ((fit.sparse != 0) & (sparse == 0)).any()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_through_the_pipeline_the_sparse_part_stays_valid_2_4_and_helps(calibration, method):
    plain = tiny_llama(vocab=VOCAB)
    prune_weights(plain, method, pattern="2:4", calibration=calibration)
    model, result = _pruned(calibration, method)
    layers = lowrank_layers(model)
    assert layers and all(isinstance(module, ArmorLinear) for module in layers.values())
    for name, module in layers.items():
        assert is_valid_nm(module.weight != 0, TWO_FOUR), name
    report = result.lowrank
    assert report["settings"]["kind"] == "armor"
    assert report["extra_parameters"] == lowrank_parameters(model) > 0
    assert report["extra_fraction"] <= 0.1
    assert all(layer["relative_error_after"] <= layer["relative_error_before"] for layer in report["layers"])
    assert report["mean_relative_error_after"] < report["mean_relative_error_before"]
    x = tiny_inputs()
    with torch.no_grad():
        reference = tiny_llama(vocab=VOCAB)(x).logits
        assert (model(x).logits - reference).square().mean() < (plain(x).logits - reference).square().mean()


def test_the_same_settings_give_the_same_model(calibration):
    first, _ = _pruned(calibration)
    second, _ = _pruned(calibration)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_save_and_load_give_identical_outputs(calibration, tmp_path):
    model, _ = _pruned(calibration, "wanda")
    x = tiny_inputs()
    with torch.no_grad():
        reference = model(x).logits
    for name, write in (("dense", write_dense), ("compressed", write_compressed)):
        (tmp_path / name).mkdir()
        write(model, tmp_path / name)
        loaded = prunekit.load(tmp_path / name, kind="causal-lm")
        assert {n: type(m) for n, m in lowrank_layers(loaded).items()} == \
            {n: type(m) for n, m in lowrank_layers(model).items()}
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, reference), name


def test_the_config_record_rebuilds_the_layer_and_refuses_a_broken_one():
    model = tiny_llama(vocab=VOCAB)
    name = "model.layers.0.mlp.gate_proj"
    weight = model.get_submodule(name).weight.detach().clone()
    attach_armor(model, name, torch.eye(4).repeat(32, 1, 1), weight, torch.eye(4).repeat(16, 1, 1))
    assert model.config.prunekit_lowrank[name] == {"kind": "armor", "block": 4, "bias": False}
    skeleton = tiny_llama(vocab=VOCAB)
    skeleton.config.prunekit_lowrank = dict(model.config.prunekit_lowrank)
    rebuilt = restore_lowrank(skeleton).get_submodule(name)
    assert isinstance(rebuilt, ArmorLinear) and rebuilt.armor_out.shape == (32, 4, 4)
    broken = tiny_llama(vocab=VOCAB)
    broken.config.prunekit_lowrank = {name: {"kind": "armor", "rank": 4, "bias": False}}
    with pytest.raises(PrunekitError, match="does not match the model"):
        restore_lowrank(broken)


def test_settings_are_checked():
    with pytest.raises(PrunekitError, match="allocation uniform"):
        LowRankSettings(budget=0.1, kind="armor", allocation="global", iterations=0)
    with pytest.raises(PrunekitError, match="at least one"):
        LowRankSettings(budget=0.1, kind="armor", iterations=0)
    assert LowRankSettings(budget=0.0, kind="armor", iterations=0).enabled is False


def test_cli_prunes_with_armor_and_reloads_it(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--lowrank-budget", "0.1",
                 "--lowrank-kind", "armor", "--no-eval", "--calib-samples", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["lowrank"]["kind"] == "armor"
    assert 0 < report["lowrank"]["extra_fraction"] <= 0.1
    assert "ARMOR's block-diagonal factors" in (out / "report.md").read_text()
    loaded = prunekit.load(out, kind="causal-lm")
    assert lowrank_parameters(loaded) == report["lowrank"]["extra_parameters"]
    again = tmp_path / "again"
    assert main(["prune", "--recipe", str(out / "recipe.yaml"), "--out", str(again)]) == 0
    reloaded = prunekit.load(again, kind="causal-lm")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reloaded.state_dict().values()))


@pytest.mark.parametrize("arguments,recipe", [
    (["--lowrank-budget", "0.1", "--lowrank-kind", "tucker"], None),
    (["--lowrank-budget", "0.1"], "lowrank: {kind: armor, allocation: global, iterations: 0}\n"),
    (["--lowrank-budget", "0.1"], "lowrank: {kind: armor, iterations: 0}\n"),
    (["--lowrank-budget", "0.1", "--lowrank-kind", "armor", "--stream"], None),
])
def test_cli_refuses_bad_armor_settings_in_one_line(tiny_model_dir, tmp_path, capsys, arguments, recipe):
    command = ["prune", str(tiny_model_dir), "--pattern", "2:4", *arguments, "--out", str(tmp_path / "o")]
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        command += ["--recipe", str(tmp_path / "recipe.yaml")]
    assert main(command) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o").exists()

"""Asymmetric calibration in one-shot pruning: each layer fitted to the dense model's output from the pruned
model's inputs."""

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.core.masks import is_valid_nm
from prunekit.core.patterns import SparsityPattern
from prunekit.errors import PrunekitError
from prunekit.weights.pipeline import prune_weights
from tests.conftest import TINY_VOCAB as VOCAB
from tests.conftest import tiny_inputs, tiny_llama


def _pruned(calibration, method, asymmetric, **settings):
    model = tiny_llama(layers=4, vocab=VOCAB)
    result = prune_weights(model, method, pattern="2:4", calibration=calibration, asymmetric=asymmetric, **settings)
    return model, result


def test_where_the_streams_have_not_parted_it_is_the_symmetric_prune_bit_for_bit(calibration):
    first = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    asymmetric, result = _pruned(calibration, "sparsegpt", True, include=first)
    symmetric, _ = _pruned(calibration, "sparsegpt", False, include=first)
    assert result.sequential == "layer, asymmetric"
    for (name, a), b in zip(asymmetric.state_dict().items(), symmetric.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method,lowrank", [("wanda", {}), ("wanda", {"budget": 0.1, "refit": True}),
                                            ("sparsegpt", {"budget": 0.1})])
def test_fitting_to_the_dense_outputs_brings_the_model_closer_to_the_dense_one(calibration, method, lowrank):
    x = tiny_inputs()
    with torch.no_grad():
        reference = tiny_llama(layers=4, vocab=VOCAB)(x).logits
        errors = {}
        for asymmetric in (False, True):
            model, _ = _pruned(calibration, method, asymmetric, lowrank=lowrank)
            errors[asymmetric] = float((model(x).logits - reference).square().mean())
            assert all(is_valid_nm(model.get_submodule(f"model.layers.{b}.mlp.down_proj").weight != 0,
                                   SparsityPattern.parse("2:4")) for b in range(4))
    assert errors[True] < errors[False]


def test_settings_without_a_twin_stream_are_refused(calibration):
    with pytest.raises(PrunekitError, match="layer by layer"):
        _pruned(calibration, "sparsegpt", True, sequential="block")
    with pytest.raises(PrunekitError, match="magnitude reads none"):
        _pruned(calibration, "magnitude", True)


def test_cli_prunes_asymmetrically_and_refuses_it_without_calibration_in_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--asymmetric",
                 "--no-eval", "--calib-samples", "4", "--seq-len", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["asymmetric"] is True and report["sequential"] == "layer, asymmetric"
    assert "layer, asymmetric" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--asymmetric",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_pattern_is_kept(calibration):
    model, _ = _pruned(calibration, "sparsegpt", True)
    pattern = SparsityPattern.parse("2:4")
    for block in range(4):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert is_valid_nm(model.get_submodule(f"model.layers.{block}.{name}").weight != 0, pattern)

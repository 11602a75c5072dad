"""Sparse + low-rank through the pruning pipeline: the budget, N:M validity, exactness at zero budget, save → load, CLI."""

import json

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.core.lowrank import lowrank_layers, lowrank_parameters
from prunekit.core.masks import is_valid_nm
from prunekit.core.patterns import SparsityPattern
from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import write_compressed, write_dense
from prunekit.weights.lowrank import LowRankSettings
from prunekit.weights.pipeline import (BlockSource, allocate_ratios, plan_pruning, prune_blocks, prune_weights,
                                        pruning_settings)
from prunekit.weights.recipe import WeightPruningRecipe
from tests.conftest import TINY_VOCAB as VOCAB
from tests.conftest import tiny_inputs, tiny_llama



def _pruned(calibration, method="sparsegpt", budget=0.0, **lowrank):
    model = tiny_llama(vocab=VOCAB)
    result = prune_weights(model, method, pattern="2:4", calibration=calibration,
                           lowrank={"budget": budget, **lowrank})
    return model, result


def test_zero_budget_is_exactly_the_sparse_model(calibration):
    sparse, result = _pruned(calibration, budget=0.0)
    plain = tiny_llama(vocab=VOCAB)
    prune_weights(plain, "sparsegpt", pattern="2:4", calibration=calibration)
    assert result.lowrank is None and not lowrank_layers(sparse)
    assert all(torch.equal(a, b) for a, b in zip(sparse.state_dict().values(), plain.state_dict().values()))
    # Fitted, then attached at a zero budget: nothing is added, the outputs are the sparse model's bit for bit.
    fitted = tiny_llama(vocab=VOCAB)
    plan = plan_pruning(fitted, pruning_settings("sparsegpt", pattern="2:4",
                                                 lowrank={"budget": 0.1, "iterations": 0, "stream": "sparse"}))
    ratios = allocate_ratios(plan, lambda name: None, None)
    prune_blocks(plan, BlockSource(fitted), ratios, calibration)
    attached = plan.correction.attach(fitted, budget=0.0)
    assert attached.extra_parameters == 0 and not lowrank_layers(fitted) and len(attached.layers) == 14
    with torch.no_grad():
        assert torch.equal(fitted(tiny_inputs()).logits, plain(tiny_inputs()).logits)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_the_sparse_part_is_the_same_valid_2_4_and_the_correction_helps(calibration, method):
    """Pruned once (no alternation) on the sparse stream, the correction leaves the sparse part bit for bit as the
    method made it."""
    sparse, _ = _pruned(calibration, method, budget=0.0)
    corrected, result = _pruned(calibration, method, budget=0.1, iterations=0, stream="sparse")
    sparse_weights = dict(sparse.named_parameters())
    layers = lowrank_layers(corrected)
    assert layers, "no layer was corrected"
    for name, module in corrected.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.") and ".lowrank_" not in name:
            assert is_valid_nm(module.weight != 0, SparsityPattern.parse("2:4")), name
            assert torch.equal(module.weight, sparse_weights[f"{name}.weight"]), name
    lowrank = result.lowrank
    assert lowrank["extra_parameters"] == lowrank_parameters(corrected) > 0
    assert lowrank["extra_fraction"] <= 0.1
    assert all(layer["relative_error_after"] <= layer["relative_error_before"] for layer in lowrank["layers"])
    assert lowrank["mean_relative_error_after"] < lowrank["mean_relative_error_before"]
    x = tiny_inputs()
    dense = tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        reference = dense(x).logits
        assert (corrected(x).logits - reference).square().mean() < (sparse(x).logits - reference).square().mean()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_alternating_keeps_2_4_and_removes_more_error_than_one_correction(calibration, method):
    once, once_result = _pruned(calibration, method, budget=0.1, iterations=0, allocation="uniform")
    refined, refined_result = _pruned(calibration, method, budget=0.1, iterations=3)
    for name, module in refined.named_modules():
        if type(module).__name__ == "LowRankCorrectedLinear":
            assert is_valid_nm(module.weight != 0, SparsityPattern.parse("2:4")), name
    once_layers = {layer["name"]: layer for layer in once_result.lowrank["layers"]}
    # The first layer sees the same inputs either way: there the refinement can only lower the error.
    first = "model.layers.0.self_attn.q_proj"
    refined_first = next(layer for layer in refined_result.lowrank["layers"] if layer["name"] == first)
    assert refined_first["relative_error_after"] <= once_layers[first]["relative_error_after"] * (1 + 1e-6)
    assert refined_result.lowrank["mean_relative_error_after"] < once_result.lowrank["mean_relative_error_after"]
    x = tiny_inputs()
    dense = tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        reference = dense(x).logits
        assert (refined(x).logits - reference).square().mean() < (once(x).logits - reference).square().mean()


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_the_budget_is_kept_and_spent(calibration, allocation):
    _, result = _pruned(calibration, budget=0.1, allocation=allocation, iterations=0)
    lowrank = result.lowrank
    largest_rank_cost = max(sum(layer["shape"]) for layer in lowrank["layers"])
    assert lowrank["extra_parameters"] <= 0.1 * sum(layer["shape"][0] * layer["shape"][1]
                                                    for layer in lowrank["layers"])
    spent = 0.1 - lowrank["extra_fraction"]
    assert spent * sum(layer["shape"][0] * layer["shape"][1] for layer in lowrank["layers"]) \
        < largest_rank_cost * (len(lowrank["layers"]) if allocation == "uniform" else 1)
    if allocation == "uniform":
        for layer in lowrank["layers"]:
            out_features, in_features = layer["shape"]
            assert layer["rank"] <= int(0.1 * out_features * in_features // (out_features + in_features))


def _input_gram(model, name: str, windows: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` of the inputs ``model`` gives its layer ``name`` on ``windows``."""
    grams = []

    def record(module, args):
        rows = args[0].reshape(-1, args[0].shape[-1]).double()
        grams.append(rows.T @ rows)

    handle = model.get_submodule(name).register_forward_pre_hook(record)
    with torch.no_grad():
        model(windows)
    handle.remove()
    return sum(grams)


@pytest.mark.parametrize("stream", ["corrected", "sparse"])
def test_later_layers_are_fitted_on_the_inputs_the_final_model_gives_them(calibration, stream):
    """With the corrected stream, the last layer's recorded errors are its errors on the inputs of the final
    (corrected) model; with the sparse stream, on those of the model without its corrections."""
    model, result = _pruned(calibration, budget=0.1, iterations=0, stream=stream)
    name = "model.layers.1.mlp.down_proj"
    dense = dict(tiny_llama(vocab=VOCAB).named_parameters())[f"{name}.weight"].detach().double()
    sparse = model.get_submodule(name).weight.detach().double()
    if stream == "sparse":
        for module in lowrank_layers(model).values():
            module.lowrank_out.weight.data.zero_()  # the model the stream ran through: no corrections
    gram = _input_gram(model, name, calibration)
    relative = float(((dense - sparse) @ gram * (dense - sparse)).sum() / (dense @ gram * dense).sum())
    recorded = next(layer for layer in result.lowrank["layers"] if layer["name"] == name)
    assert recorded["relative_error_before"] == pytest.approx(relative, rel=1e-4)
    assert result.lowrank["settings"]["stream"] == stream


def test_the_corrected_stream_gives_the_model_closer_to_the_dense_one(calibration):
    x = tiny_inputs()
    with torch.no_grad():
        reference = tiny_llama(vocab=VOCAB)(x).logits
        errors = {stream: (_pruned(calibration, budget=0.1, iterations=0, stream=stream)[0](x).logits - reference)
                  .square().mean() for stream in ("corrected", "sparse")}
    assert errors["corrected"] < errors["sparse"]


def test_global_allocation_beats_uniform_on_the_summed_relative_error(calibration):
    errors = {}
    for allocation in ("global", "uniform"):
        _, result = _pruned(calibration, budget=0.1, allocation=allocation, iterations=0)
        errors[allocation] = result.lowrank["mean_relative_error_after"]
    assert errors["global"] <= errors["uniform"]


def test_save_and_load_give_identical_outputs(calibration, tmp_path):
    model, _ = _pruned(calibration, "wanda", budget=0.1)
    x = tiny_inputs()
    with torch.no_grad():
        reference = model(x).logits
    (tmp_path / "dense").mkdir()
    write_dense(model, tmp_path / "dense")
    (tmp_path / "compressed").mkdir()
    write_compressed(model, tmp_path / "compressed")
    for name in ("dense", "compressed"):
        loaded = prunekit.load(tmp_path / name, kind="causal-lm")
        assert set(lowrank_layers(loaded)) == set(lowrank_layers(model))
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, reference), name


def test_settings_are_checked_and_streaming_refuses_the_correction():
    with pytest.raises(PrunekitError, match="per-layer cap"):
        LowRankSettings(budget=0.5, layer_cap=0.3)
    with pytest.raises(PrunekitError, match="iterations 0"):
        LowRankSettings(budget=0.1, allocation="global", iterations=2)
    with pytest.raises(PrunekitError, match="in memory"):
        WeightPruningRecipe.build({"stream": True, "lowrank": {"budget": 0.1}})
    with pytest.raises(PrunekitError, match="needs calibration data"):
        prune_weights(tiny_llama(vocab=VOCAB), "magnitude", lowrank={"budget": 0.1})


def test_cli_prunes_with_a_correction_and_writes_it_in_the_report(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--pattern", "2:4", "--lowrank-budget", "0.1",
                 "--lowrank-refit", "--no-eval", "--calib-samples", "4", "--seq-len", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["lowrank"]["extra_fraction"] <= 0.1
    assert report["recipe"]["lowrank"]["budget"] == 0.1 and report["recipe"]["lowrank"]["refit"] is True
    assert "low-rank correction" in (out / "report.md").read_text()
    assert "kept values refit" in (out / "report.md").read_text()
    loaded = prunekit.load(out, kind="causal-lm")
    assert lowrank_parameters(loaded) == report["lowrank"]["extra_parameters"]
    again = tmp_path / "again"
    assert main(["prune", "--recipe", str(out / "recipe.yaml"), "--out", str(again)]) == 0
    assert json.loads((again / "report.json").read_text())["lowrank"]["extra_parameters"] == \
        report["lowrank"]["extra_parameters"]


def test_cli_refuses_a_bad_budget_in_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["prune", str(tiny_model_dir), "--lowrank-budget", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_refitting_the_kept_values_keeps_2_4_and_lowers_the_first_layers_error(calibration, method):
    plain, plain_result = _pruned(calibration, method, budget=0.1, iterations=2)
    refit, refit_result = _pruned(calibration, method, budget=0.1, iterations=2, refit=True)
    for name, module in refit.named_modules():
        if type(module).__name__ == "LowRankCorrectedLinear":
            assert is_valid_nm(module.weight != 0, SparsityPattern.parse("2:4")), name
    first = "model.layers.0.self_attn.q_proj"
    errors = [next(layer for layer in result.lowrank["layers"] if layer["name"] == first)["relative_error_after"]
              for result in (plain_result, refit_result)]
    assert errors[1] < errors[0]


def test_the_kept_value_refit_never_raises_the_error_and_keeps_the_mask():
    from prunekit.core.lowrank import refit_kept_values

    generator = torch.Generator().manual_seed(0)
    for trial in range(4):
        inputs = torch.randn(96, 16, generator=generator, dtype=torch.float64) @ torch.randn(
            16, 16, generator=generator, dtype=torch.float64)
        hessian = inputs.T @ inputs + 1e-3 * torch.eye(16, dtype=torch.float64)
        target = torch.randn(8, 16, generator=generator, dtype=torch.float64)
        sparse = target * (torch.rand(8, 16, generator=generator) < 0.5)

        def error(weight):
            difference = target - weight
            return float(((difference @ hessian) * difference).sum())

        fitted = refit_kept_values(target, sparse, hessian, steps=200)
        assert torch.equal(fitted != 0, sparse != 0) or bool(((fitted != 0) <= (sparse != 0)).all())
        assert error(fitted) <= error(sparse) * (1 + 1e-9)
        # the optimum of each row on its kept columns, solved directly
        for row in range(8):
            kept = sparse[row] != 0
            best = torch.linalg.solve(hessian[kept][:, kept], (target[row] @ hessian)[kept])
            assert torch.allclose(fitted[row, kept], best, rtol=1e-5, atol=1e-7), (trial, row)

"""The level database's calibration streams (issue 18): the dense stream, and the reference stream whose levels
are computed from the inputs the uniform sequential pipeline gives each layer."""

import copy

import pytest
import torch

from prunekit.weights.pipeline import plan_pruning, prune_weights, pruning_settings
from prunekit.weights.search.database import LevelDatabase, Stream, choose_stream, group_units
from tests.conftest import tiny_llama

GRID = [0.0, 0.25, 0.5, 0.75]


def _model():
    return tiny_llama(layers=3, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=256, seed=3)


def _calibration():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def _plan(model, method, ratio=0.5, sequential="layer"):
    allocation = {"name": "knapsack", "step": 0.25, "max_ratio": 0.75}
    return plan_pruning(model, pruning_settings(method, ratio, allocation=allocation, sequential=sequential,
                                                batch_size=2))


def _build(tmp_path, model, plan, stream, name):
    units = group_units(plan.adapter, plan.targets, "sublayer")
    database = LevelDatabase.at(tmp_path, name, units, GRID, stream)
    database.build(plan, _calibration(), 2)
    return database


def _weights(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("method,sequential", [("sparsegpt", "layer"), ("sparsegpt", "block"), ("wanda", "layer")])
def test_the_reference_level_is_the_uniform_pipelines_layer(tmp_path, method, sequential):
    model = _model()
    dense = _weights(model)
    plan = _plan(model, method, sequential=sequential)
    database = _build(tmp_path, model, plan, Stream.reference(plan), "reference")
    assert all(torch.equal(dense[name], weight) for name, weight in _weights(model).items())  # left dense
    pruned = copy.deepcopy(model)
    prune_weights(pruned, method, 0.5, calibration=_calibration(), sequential=sequential, batch_size=2)
    expected = _weights(pruned)
    for number, unit in enumerate(database.units):
        stored = database.load(number, GRID.index(0.5))
        for target in unit.targets:
            assert torch.equal(stored[target.name], expected[f"{target.name}.weight"]), target.name


def test_the_dense_stream_differs_from_the_pipeline_after_the_first_layer(tmp_path):
    """What the reference stream corrects: SparseGPT's levels fitted on dense inputs are not what the sequential
    pipeline gives any layer past the first, while both streams see the first layer's dense inputs alike."""
    model = _model()
    plan = _plan(model, "sparsegpt")
    dense = _build(tmp_path, model, plan, Stream.dense(), "dense")
    reference = _build(tmp_path, model, plan, Stream.reference(plan), "reference")
    step = GRID.index(0.5)
    first = dense.units[0].targets[0].name
    assert torch.equal(dense.load(0, step)[first], reference.load(0, step)[first])
    for number, unit in enumerate(dense.units[1:], start=1):
        for level in range(1, len(GRID)):
            ours, theirs = dense.load(number, level), reference.load(number, level)
            assert not any(torch.equal(ours[t.name], theirs[t.name]) for t in unit.targets), (unit.name, level)


def test_a_reference_build_resumes_to_the_same_levels(tmp_path):
    model = _model()
    plan = _plan(model, "sparsegpt")
    whole = _build(tmp_path / "whole", model, plan, Stream.reference(plan), "key")
    interrupted = _build(tmp_path / "resumed", model, plan, Stream.reference(plan), "key")
    (interrupted.directory / "block-0001.done").unlink()
    (interrupted.directory / "block-0002.done").unlink()
    dense = _weights(model)
    resumed = LevelDatabase.at(tmp_path / "resumed", "key", whole.units, GRID, Stream.reference(plan))
    resumed.build(plan, _calibration(), 2)
    assert resumed.built_blocks == 2
    assert all(torch.equal(dense[name], weight) for name, weight in _weights(model).items())
    for number, unit in enumerate(whole.units):
        for level in range(len(GRID)):
            expected, found = whole.load(number, level), resumed.load(number, level)
            assert all(torch.equal(expected[t.name], found[t.name]) for t in unit.targets)


def test_the_key_names_the_stream_and_its_reference_ratio():
    model = _model()
    calibration = _calibration()
    keys = {}
    for label, ratio, stream in [("dense", 0.5, "dense"), ("dense at another ratio", 0.25, "dense"),
                                 ("reference", 0.5, "reference"), ("reference at 0.25", 0.25, "reference")]:
        plan = _plan(model, "sparsegpt", ratio)
        units = group_units(plan.adapter, plan.targets, "sublayer")
        keys[label] = LevelDatabase.key("digest", plan, units, GRID, calibration, 2, choose_stream(stream, plan))
    assert keys["dense"] == keys["dense at another ratio"]  # one dense database serves every ratio
    assert len({keys["dense"], keys["reference"], keys["reference at 0.25"]}) == 3
    block_mode = _plan(model, "sparsegpt", sequential="block")
    units = group_units(block_mode.adapter, block_mode.targets, "sublayer")
    assert LevelDatabase.key("digest", block_mode, units, GRID, calibration, 2,
                             Stream.reference(block_mode)) != keys["reference"]


def test_auto_takes_the_reference_stream_for_methods_that_update_the_kept_weights():
    model = _model()
    assert choose_stream("auto", _plan(model, "sparsegpt")) == Stream("reference", 0.5, "layer")
    assert choose_stream("auto", _plan(model, "wanda")) == Stream.dense()
    assert choose_stream("auto", _plan(model, "magnitude")) == Stream.dense()

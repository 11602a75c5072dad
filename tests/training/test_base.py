"""The invariants every sparsifier keeps: masked forward, frozen zeros, optimizer resets, layer choice."""

import pytest
import torch
from torch import nn

from prunekit.core.masks import get_mask, pruned_count
from prunekit.errors import PrunekitError
from prunekit.training import GMP, SET, FixedMask, OneShotMagnitude, build_sparsifier
from prunekit.training.base import select_layers
from tests.training._helpers import batches, tiny_cnn, train_steps


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_get_no_update_and_stay_exactly_zero(optimizer):
    model = tiny_cnn()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)}[optimizer]
    opt = make(model.parameters())
    data = batches(3)
    # momentum / Adam moments are non-zero everywhere before pruning
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sparsifier = OneShotMagnitude(model, 0.7, "uniform", optimizer=opt)
    masks = sparsifier.masks()
    for layer in sparsifier.layers:
        state = opt.state[layer.original]
        for value in state.values():
            if torch.is_tensor(value) and value.shape == layer.shape:
                assert torch.all(value[~layer.mask] == 0)  # zeroed when pruned

    def check():
        for layer in sparsifier.layers:
            assert torch.equal(layer.mask, masks[layer.name])
            assert torch.all(layer.original[~layer.mask] == 0)
            assert torch.all(layer.weight[~layer.mask] == 0)

    train_steps(model, sparsifier, data, opt, after_step=check, repeat=2)


def test_forward_and_state_dict_see_the_masked_weight():
    model = tiny_cnn()
    sparsifier = OneShotMagnitude(model, 0.5, "uniform")
    plain = tiny_cnn()
    with torch.no_grad():
        for layer in sparsifier.layers:
            plain.get_submodule(layer.name).weight.copy_(layer.weight)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), plain(x))
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    assert any(k.endswith("parametrizations.weight.0.mask") for k in state)


def test_regrown_weights_start_at_zero_with_reset_optimizer_state():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = SET(model, 0.8, "uniform", end_step=100, update_interval=2, drop_fraction=0.5, optimizer=opt)
    data = batches(1)
    train_steps(model, sparsifier, data, opt)  # step 1: no update, momentum builds up
    before = sparsifier.masks()
    train_steps(model, sparsifier, data, opt)  # step 2: drop and grow
    grown_any = False
    for layer in sparsifier.layers:
        grown = layer.mask & ~before[layer.name]
        dropped = before[layer.name] & ~layer.mask
        momentum = opt.state[layer.original]["momentum_buffer"]
        assert torch.all(layer.original[grown] == 0) and torch.all(momentum[grown] == 0)
        assert torch.all(layer.original[dropped] == 0) and torch.all(momentum[dropped] == 0)
        grown_any |= bool(grown.any())
    assert grown_any


def test_layer_selection_skips_tied_weights_and_the_lm_head():
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=256)
    names = [name for name, _ in select_layers(model)]
    assert "lm_head" not in names and names and all(".layers." in n for n in names)
    with pytest.raises(PrunekitError, match="shares its weight"):
        select_layers(model, include=["lm_head"])
    untied = tiny_llama(vocab=256, tie=False)
    assert "lm_head" in [n for n, _ in select_layers(untied, include=["lm_head"])]
    with pytest.raises(PrunekitError, match="no linear or convolution layer"):
        select_layers(model, include=["nothing.*"])


def test_include_and_exclude_choose_the_layers():
    model = tiny_cnn()
    sparsifier = OneShotMagnitude(model, 0.5, "uniform", exclude=["conv1"])
    assert [l.name for l in sparsifier.layers] == ["conv2", "fc1", "fc2"]
    assert get_mask(model.conv1) is None


@pytest.mark.parametrize("bad, message", [
    (dict(sparsity=1.0, end_step=10), "sparsity must be in \\[0, 1\\)"),
    (dict(sparsity=-0.1, end_step=10), "sparsity must be in \\[0, 1\\)"),
    (dict(sparsity="lots", end_step=10), "must be a number"),
    (dict(sparsity=0.5), "gmp needs the setting 'end_step'"),
    (dict(sparsity=0.5, end_step=10, start_step=20), "ends \\(step 10\\) before it starts \\(step 20\\)"),
    (dict(sparsity=0.5, end_step=10, start_step=10), "before it starts"),
    (dict(sparsity=0.5, end_step=10, frequency=0), "frequency .* positive whole number"),
    (dict(sparsity=0.5, end_step=10, initial_sparsity=0.7), "initial_sparsity 0.7 is above"),
    (dict(sparsity=0.5, end_step=10, distribution="owl"), "needs calibration activations"),
    (dict(sparsity=0.5, end_step=10, distribution="spiky"), "unknown allocation 'spiky'"),
    (dict(sparsity=0.5, end_step=10, speed=3), "gmp has no setting 'speed'"),
])
def test_bad_settings_are_one_line_errors_that_leave_the_model_alone(bad, message):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=message):
        build_sparsifier("gmp", model, **bad)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, settings, message", [
    ("rigl", dict(end_step=10, update_interval=0), "update_interval must be a positive whole number"),
    ("set", dict(end_step=0), "end_step must be a positive whole number"),
    ("set", dict(end_step=10, drop_fraction=1.5), "drop_fraction must be in \\(0, 1\\)"),
    ("rigl", dict(end_step=10, decay="linear"), "decay must be cosine or constant"),
    ("lottery", dict(steps_per_round=10, rewind_step=10), "rewind_step 10 must come before"),
    ("lottery", dict(steps_per_round=10, schedule=[0.5, 0.3]), "strictly increasing"),
    ("lottery", dict(steps_per_round=10, rounds=2, per_round=0.2), "give one of"),
    ("grasp", dict(data=[], batches=1), "no data"),
    ("synflow", dict(), "give the shape of one input"),
    ("synflow", dict(example_input=torch.zeros(1, 5, dtype=torch.long)), "float inputs"),
    ("channel_gmp", dict(end_step=10, distribution="erk"), "does not apply to channels"),
    ("grasp", dict(data=batches(1), distribution="lamp"), "signed"),
    ("nonsense", dict(), "unknown sparse-training method 'nonsense'"),
])
def test_method_settings_are_validated(name, settings, message):
    with pytest.raises(PrunekitError, match=message):
        build_sparsifier(name, tiny_cnn(), **{"sparsity": 0.5, **settings})


def test_fixed_mask_keeps_existing_zeros_and_given_masks():
    model = tiny_cnn()
    with torch.no_grad():
        model.fc1.weight[:, :10] = 0
    sparsifier = FixedMask(model)
    assert torch.equal(sparsifier._by_name["fc1"].mask, model.fc1.weight != 0)
    assert sparsifier.target_sparsity == pytest.approx(sparsifier.sparsity)
    other = tiny_cnn()
    mask = torch.rand(10, 24) > 0.5
    FixedMask(other, {"fc2": mask})
    assert torch.equal(get_mask(other.fc2).mask, mask)  # random weights have no zeros of their own
    with pytest.raises(PrunekitError, match="no sparsified layer is called"):
        FixedMask(tiny_cnn(), {"fc9": mask})


def test_squash_bakes_the_masks_and_ends_the_sparsifier():
    model = tiny_cnn()
    sparsifier = GMP(model, 0.6, end_step=2, frequency=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, sparsifier, batches(2), opt)
    x = torch.randn(3, 1, 16, 16)
    expected = model(x)
    sparsifier.squash()
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.equal(model(x), expected)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) >= pruned_count(weight.numel(), 0.6)
    with pytest.raises(PrunekitError, match="squashed"):
        sparsifier.step()

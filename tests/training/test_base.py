"""The invariants every sparsifier keeps: masked forward, frozen zeros, optimizer resets, layer choice."""

import pytest
import torch
from torch import nn

from prunekit.core.masks import get_mask, pruned_count
from prunekit.errors import PrunekitError
from prunekit.training import GMP, SET, SPARSIFIERS, FixedMask, OneShotMagnitude
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


def create(name: str, model, sparsity=0.5, distribution=None, provided=None, **settings):
    """A method's settings from the registry, put to work on ``model``: the path of recipes and jobs."""
    return SPARSIFIERS.build(name, **settings).create(model, sparsity, distribution, **(provided or {}))


@pytest.mark.parametrize("sparsity, settings, message", [
    (1.0, dict(end_step=10), "sparsity must be in \\[0, 1\\)"),
    (-0.1, dict(end_step=10), "sparsity must be in \\[0, 1\\)"),
    ("lots", dict(end_step=10), "must be a number"),
    (0.5, dict(), "gmp: end_step: Field required"),
    (0.5, dict(end_step=10, start_step=20), "ends \\(step 10\\) before it starts \\(step 20\\)"),
    (0.5, dict(end_step=10, start_step=10), "before it starts"),
    (0.5, dict(end_step=10, frequency=0), "frequency: Input should be greater than or equal to 1"),
    (0.5, dict(end_step=10, initial_sparsity=0.7), "initial_sparsity 0.7 is above"),
    (0.5, dict(end_step=10, distribution="owl"), "needs calibration activations"),
    (0.5, dict(end_step=10, distribution="spiky"), "unknown allocation 'spiky'"),
    (0.5, dict(end_step=10, speed=3), "gmp has no setting 'speed'; its settings are: end_step, frequency, "
                                      "initial_sparsity, start_step"),
])
def test_bad_settings_are_one_line_errors_that_leave_the_model_alone(sparsity, settings, message):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distribution = settings.pop("distribution", None)
    with pytest.raises(PrunekitError, match=message) as caught:
        create("gmp", model, sparsity, distribution, **settings)
    assert "\n" not in str(caught.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_wrong_setting_is_refused_in_one_line_when_the_method_is_built():
    for spec in ({"rigl": {"end_step": 500, "update_intervall": 50}},
                 {"name": "rigl", "end_step": 500, "update_intervall": 50}):
        with pytest.raises(PrunekitError) as caught:
            SPARSIFIERS.build(spec)
        assert str(caught.value) == ("sparse-training method rigl has no setting 'update_intervall'; its settings "
                                     "are: decay, drop_fraction, end_step, update_interval")
    with pytest.raises(PrunekitError, match="^sparse-training method lottery: steps_per_round: Input should be a "
                                            "valid integer"):
        SPARSIFIERS.build({"lottery": {"steps_per_round": "many"}})
    built = SPARSIFIERS.build({"rigl": {"end_step": 50, "drop_fraction": 0.2}})
    assert built.settings() == {"name": "rigl", "end_step": 50, "update_interval": 100, "drop_fraction": 0.2,
                                "decay": "cosine"}


@pytest.mark.parametrize("name, settings, provided, message", [
    ("rigl", dict(end_step=10, update_interval=0), {}, "update_interval: Input should be greater than or equal to 1"),
    ("set", dict(end_step=0), {}, "end_step: Input should be greater than or equal to 1"),
    ("set", dict(end_step=10, drop_fraction=1.5), {}, "drop_fraction: Input should be less than 1"),
    ("rigl", dict(end_step=10, decay="linear"), {}, "decay: Input should be 'cosine' or 'constant'"),
    ("lottery", dict(steps_per_round=10, rewind_step=10), {}, "rewind_step 10 must come before"),
    ("lottery", dict(steps_per_round=10, schedule=[0.5, 0.3]), {}, "strictly increasing"),
    ("lottery", dict(steps_per_round=10, rounds=2, per_round=0.2), {}, "give one of"),
    ("grasp", dict(batches=1), dict(data=[]), "no data"),
    ("snip", dict(), {}, "snip scores the weights on training data: pass data="),
    ("synflow", dict(), {}, "give the shape of one input"),
    ("synflow", dict(input_shape=[1, 0]), {}, "input_shape must be positive sizes"),
    ("synflow", dict(), dict(example_input=torch.zeros(1, 5, dtype=torch.long)), "float inputs"),
    ("channel_gmp", dict(end_step=10), dict(distribution="erk"), "does not apply to channels"),
    ("grasp", dict(), dict(data=batches(1), distribution="lamp"), "signed"),
    ("nonsense", dict(), {}, "unknown sparse-training method 'nonsense'"),
])
def test_method_settings_are_validated(name, settings, provided, message):
    provided = dict(provided)
    distribution = provided.pop("distribution", None)
    with pytest.raises(PrunekitError, match=message):
        create(name, tiny_cnn(), 0.5, distribution, provided, **settings)


def test_settings_go_in_the_method_object_or_as_keywords():
    method = SPARSIFIERS.build({"gmp": {"end_step": 4, "frequency": 2}})
    by_object = GMP(tiny_cnn(), 0.5, method=method)
    by_keywords = GMP(tiny_cnn(), 0.5, end_step=4, frequency=2)
    assert by_object.method == by_keywords.method == method
    assert by_object.describe() == by_keywords.describe()
    with pytest.raises(PrunekitError, match="not both"):
        GMP(tiny_cnn(), 0.5, method=method, frequency=3)
    with pytest.raises(PrunekitError, match="GMP runs gmp, not set"):
        GMP(tiny_cnn(), 0.5, method=SPARSIFIERS.build({"set": {"end_step": 4}}))
    with pytest.raises(PrunekitError, match="fixed keeps the mask the model has; it takes no sparsity"):
        SPARSIFIERS.build("fixed").create(tiny_cnn(), 0.5)


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

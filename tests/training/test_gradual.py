"""GMP and its channel variant: the cubic schedule, exact per-layer sparsity at every step, monotone masks."""

import pytest
import torch

from prunekit.core.allocation import get_allocation
from prunekit.core.masks import pruned_count
from prunekit.training import GMP, ChannelGMP, GraNet
from prunekit.training.schedules import CubicSchedule
from tests.training._helpers import batches, tiny_cnn, train_steps


def test_cubic_schedule_values():
    schedule = CubicSchedule.build(10, 50, 10, 0.0, 0.8, "gmp")
    assert schedule.sparsity_at(0) == 0.0 and schedule.sparsity_at(10) == 0.0
    assert schedule.sparsity_at(30) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert schedule.sparsity_at(50) == 0.8 and schedule.sparsity_at(99) == 0.8
    assert [t for t in range(60) if schedule.is_update(t)] == [10, 20, 30, 40, 50]
    # the final sparsity is reached at end_step even when the frequency does not divide the window
    uneven = CubicSchedule.build(0, 25, 10, 0.2, 0.9, "gmp")
    assert [t for t in range(40) if uneven.is_update(t)] == [0, 10, 20, 25]


@pytest.mark.parametrize("distribution", ["uniform", "erk", {"name": "erk", "dense_first_layer": True}, "global", "lamp"])
def test_exact_per_layer_sparsity_at_every_step(distribution):
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = GMP(model, 0.9, distribution, start_step=2, end_step=12, frequency=3, optimizer=opt)
    schedule = sparsifier.schedule
    allocation = get_allocation(distribution)
    previous = sparsifier.masks()
    last_target = 0.0

    def check():
        nonlocal previous, last_target
        step = sparsifier.steps
        if schedule.is_update(step):
            last_target = schedule.sparsity_at(step)
        for layer in sparsifier.layers:
            assert torch.all(previous[layer.name] | ~layer.mask)  # monotone: nothing revives
            assert torch.all(layer.weight[~layer.mask] == 0)
        if allocation.needs == "nothing":
            expected = allocation.allocate([l.info() for l in sparsifier.layers], last_target, None)
            for layer in sparsifier.layers:
                assert layer.numel - layer.active == pruned_count(layer.numel, expected[layer.name]), (step, layer.name)
        else:  # a score-driven split: only the total is fixed
            total = sum(l.numel for l in sparsifier.layers)
            assert sum(l.numel - l.active for l in sparsifier.layers) == pytest.approx(
                pruned_count(total, last_target), abs=len(sparsifier.layers))
        previous = sparsifier.masks()

    train_steps(model, sparsifier, batches(4), opt, after_step=check, repeat=4)
    assert sparsifier.steps == 16
    assert sparsifier.sparsity == pytest.approx(0.9, abs=2e-3)
    assert [r["step"] for r in sparsifier.history if r["event"] == "prune"] == [2, 5, 8, 11, 12]


def test_gmp_prunes_the_smallest_magnitudes():
    model = tiny_cnn()
    before = {name: module.weight.detach().abs().clone() for name, module in model.named_modules()
              if name in ("conv1", "conv2", "fc1", "fc2")}
    sparsifier = GMP(model, 0.5, "uniform", start_step=0, end_step=1, frequency=1, initial_sparsity=0.5)
    for layer in sparsifier.layers:
        magnitude = before[layer.name]
        assert layer.numel - layer.active == pruned_count(layer.numel, 0.5)
        assert magnitude[~layer.mask].max() <= magnitude[layer.mask].min()
        assert torch.all(layer.original.detach()[~layer.mask] == 0)


def test_channel_gmp_prunes_whole_channels_with_their_bias():
    model = tiny_cnn(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = ChannelGMP(model, 0.5, start_step=0, end_step=4, frequency=2, optimizer=opt)
    assert [l.name for l in sparsifier.layers] == ["conv1", "conv2", "fc1"]  # the output layer stays whole

    def check():
        for layer in sparsifier.layers:
            rows = layer.mask.reshape(layer.shape[0], -1)
            assert torch.all(rows.all(dim=1) | ~rows.any(dim=1))  # every channel whole or gone
            gone = ~rows.any(dim=1)
            assert torch.all(layer.module.bias[gone] == 0)

    train_steps(model, sparsifier, batches(3), opt, after_step=check, repeat=2)
    assert sparsifier.pruned_channels() == {"conv1": 4, "conv2": 8, "fc1": 12}
    # a pruned fc1 neuron outputs exactly zero
    captured = {}
    model.fc1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    model(torch.randn(5, 1, 16, 16))
    gone = ~sparsifier.channel_mask(sparsifier._by_name["fc1"])
    assert torch.all(captured["out"][:, gone] == 0)
    sparsifier.squash()
    assert torch.all(model.fc1.bias[gone] == 0) and not hasattr(model.fc1, "parametrizations")


def test_granet_reaches_its_target_and_regenerates():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = GraNet(model, 0.8, start_step=0, end_step=8, frequency=2, drop_fraction=0.5, optimizer=opt)
    train_steps(model, sparsifier, batches(4), opt, repeat=3)
    events = [r["event"] for r in sparsifier.history]
    assert any(e.startswith("regenerate") for e in events)
    total = sum(l.numel for l in sparsifier.layers)
    assert sum(l.numel - l.active for l in sparsifier.layers) == pytest.approx(pruned_count(total, 0.8), abs=4)

"""SET and RigL: constant active counts through updates, the growth criteria, the decay schedule."""

import math

import pytest
import torch

from prunekit.training import SET, RigL
from prunekit.training.dynamic import drop_and_grow
from prunekit.training.schedules import UpdateSchedule
from tests.training._helpers import batches, tiny_cnn, train_steps


@pytest.mark.parametrize("cls", [SET, RigL])
@pytest.mark.parametrize("distribution", ["erk", "uniform", "global"])
def test_active_counts_stay_constant_through_updates(cls, distribution):
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = cls(model, 0.9, distribution, end_step=30, update_interval=3, drop_fraction=0.4, optimizer=opt)
    counts = {l.name: l.active for l in sparsifier.layers}
    masks = sparsifier.masks()
    changed_at = []

    def check():
        for layer in sparsifier.layers:
            assert layer.active == counts[layer.name]
            assert torch.count_nonzero(layer.weight) <= counts[layer.name]
        if any(not torch.equal(sparsifier._by_name[n].mask, m) for n, m in masks.items()):
            changed_at.append(sparsifier.steps)
        masks.update(sparsifier.masks())

    train_steps(model, sparsifier, batches(5), opt, after_step=check, repeat=5)
    assert changed_at and all(step % 3 == 0 and step < 30 for step in changed_at)


def test_drop_and_grow_by_hand():
    mask = torch.tensor([True, True, True, False, False, False])
    magnitude = torch.tensor([0.5, 0.1, 0.9, 0.0, 0.0, 0.0])
    grow = torch.tensor([9.0, 9.0, 0.0, 0.3, 0.7, 0.1])
    # drops the weakest active (index 1, |w| 0.1); grows the strongest inactive after the drop:
    # index 1 (score 9) is a candidate again and is regrown: it keeps its value, nothing else changes
    assert torch.equal(drop_and_grow(mask, magnitude, grow, 1), mask)
    grow[1] = 0.0
    assert torch.equal(drop_and_grow(mask, magnitude, grow, 1), torch.tensor([True, False, True, False, True, False]))
    # two: drops indices 1 and 0; of the candidates 0, 1, 3, 4, 5 the best two are 0 (9.0) and 4 (0.7)
    assert torch.equal(drop_and_grow(mask, magnitude, grow, 2), torch.tensor([True, False, True, False, True, False]))
    grow[0] = 0.0
    assert torch.equal(drop_and_grow(mask, magnitude, grow, 2), torch.tensor([False, False, True, True, True, False]))


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights do not move: the update is predictable
    sparsifier = RigL(model, 0.8, "uniform", end_step=100, update_interval=1, drop_fraction=0.3, optimizer=opt)
    x, y = batches(1)[0]
    before = sparsifier.masks()
    magnitudes = {l.name: l.weight.detach().abs().clone() for l in sparsifier.layers}
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    # the dense gradient by hand: the same loss through the unmasked weights with the masked values
    dense = {}
    with torch.enable_grad():
        weights = {l.name: l.weight.detach().clone().requires_grad_(True) for l in sparsifier.layers}
        handles = [sparsifier._by_name[name].parametrization.register_forward_hook(
            lambda m, i, o, name=name: weights[name]) for name in weights]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(weights.values()))
        for handle in handles:
            handle.remove()
        dense = dict(zip(weights, grads))
    opt.step()
    sparsifier.step()
    for layer in sparsifier.layers:
        expected = drop_and_grow(before[layer.name], magnitudes[layer.name], dense[layer.name].abs(),
                                 int(0.3 / 2 * (1 + math.cos(math.pi / 100)) * before[layer.name].sum()))
        assert torch.equal(layer.mask, expected), layer.name


def test_rigl_without_backward_is_a_clear_error():
    model = tiny_cnn()
    sparsifier = RigL(model, 0.8, end_step=10, update_interval=1)
    from prunekit.errors import PrunekitError

    with pytest.raises(PrunekitError, match="no gradient reached"):
        sparsifier.step()


def test_set_growth_is_seeded():
    def run(seed):
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sparsifier = SET(model, 0.9, end_step=20, update_interval=2, seed=seed, optimizer=opt)
        train_steps(model, sparsifier, batches(2), opt, repeat=3)
        return sparsifier.masks()

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_cosine_decay_of_the_update_fraction():
    schedule = UpdateSchedule.build(100, 1000, 0.3, "cosine", "rigl")
    assert schedule.fraction_at(0) == pytest.approx(0.3)
    assert schedule.fraction_at(500) == pytest.approx(0.15)
    assert schedule.fraction_at(1000) == pytest.approx(0.0)
    assert [t for t in range(1200) if schedule.is_update(t)] == list(range(100, 1000, 100))
    assert UpdateSchedule.build(100, 1000, 0.3, "constant", "set").fraction_at(900) == 0.3

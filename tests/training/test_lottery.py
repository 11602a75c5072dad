"""Lottery tickets: per-round sparsities, bit-exact rewinding, the round loop of train_sparse."""

import pytest
import torch

from prunekit.core.masks import pruned_count
from prunekit.training import LotteryTicket, train_sparse
from prunekit.training.methods.lottery import round_sparsities
from tests.training._helpers import batches, tiny_cnn, tiny_mlp, train_steps


def test_round_sparsities():
    assert round_sparsities(0.9, None, 2, None, "lottery") == pytest.approx([1 - 0.1 ** 0.5, 0.9])
    per_round = round_sparsities(0.5, 0.2, None, None, "lottery")
    assert per_round == pytest.approx([0.2, 0.36, 0.488, 0.5])
    assert round_sparsities(0.98, None, None, [0.8, 0.9, 0.98], "lottery") == [0.8, 0.9, 0.98]
    assert round_sparsities(0.0, None, None, None, "lottery") == []


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_a_round_rewinds_weights_bit_exactly_to_the_stored_values(rewind_step):
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # two rounds to 75 %: the first prunes to 1 − 0.25^(1/2) = 50 %, globally by magnitude
    ticket = LotteryTicket(model, 0.75, steps_per_round=8, rewind_step=rewind_step, rounds=2, optimizer=opt)
    stored = {}

    def remember():
        if ticket.steps == rewind_step:
            stored.update({k: v.clone() for k, v in model.state_dict().items() if not k.endswith("mask")})

    remember()
    data = batches(4)
    train_steps(model, ticket, data, opt, after_step=remember)  # 4 steps
    train_steps(model, ticket, data, opt, after_step=remember)  # 8 steps: round 0 ends, prune, rewind
    assert ticket.round == 1 and ticket.rewound and ticket.round_step == rewind_step
    assert opt.state == {} or all(not s for s in opt.state.values())
    state = model.state_dict()
    for key, value in stored.items():
        if key.endswith(".original"):
            mask = state[key.replace("original", "0.mask")]
            assert torch.equal(state[key][mask].view(torch.int32), value[mask].view(torch.int32)), key
            assert torch.all(state[key][~mask] == 0)
        else:
            assert torch.equal(state[key], value), key  # biases, BatchNorm weights and running statistics too
    total = sum(l.numel for l in ticket.layers)
    assert sum(l.numel - l.active for l in ticket.layers) == pruned_count(total, 0.5)


def test_pruning_is_global_magnitude_of_the_trained_weights_and_monotone():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, 0.8, steps_per_round=2, rounds=2, optimizer=opt)
    data = [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(2)]
    train_steps(model, ticket, data[:1], opt)
    first_masks = ticket.masks()
    x, y = data[1]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    trained = {l.name: l.weight.detach().abs().clone() for l in ticket.layers}  # what round 0 ends with
    ticket.step()
    flat = torch.cat([trained[l.name].reshape(-1) for l in ticket.layers])
    threshold = flat.sort().values[pruned_count(flat.numel(), 1 - 0.2 ** 0.5) - 1]
    for layer in ticket.layers:
        assert torch.equal(ticket.masks()[layer.name], trained[layer.name] > threshold)
    train_steps(model, ticket, data, opt)  # round 1 (from step 0): 2 steps, prune to 80 %
    assert ticket.finished and ticket.sparsity == pytest.approx(0.8, abs=1e-3)
    assert all(torch.all(first_masks[n] | ~m) for n, m in ticket.masks().items())
    assert all(m.all() for m in first_masks.values())  # round 0 is dense


def test_train_sparse_runs_every_round_and_reports_each(fashion_small):
    train, test = fashion_small
    x, y = train.images[:512], train.labels[:512]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    steps = 2 * 4  # 2 epochs of 4 batches
    ticket = LotteryTicket(model, 0.9, steps_per_round=steps, rewind_step=4, schedule=[0.5, 0.9])
    run = train_sparse(model, ticket, x, y, epochs=2, batch_size=128, test=(test.images, test.labels))
    assert [r["round"] for r in run.rounds] == [0, 1, 2]
    assert [round(r["sparsity"], 3) for r in run.rounds] == [0.0, 0.5, 0.9]
    assert run.steps == ticket.total_steps == 8 + 2 * 4
    assert [e["epoch"] for e in run.epochs] == [0, 1, 1, 1]  # later rounds resume at the rewind epoch
    assert run.final_accuracy > 0.5

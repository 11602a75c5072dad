"""FLOP counts against hand formulas, and the throughput measurement's arithmetic."""

import torch
from torch import nn

from prunekit.tokens import apply
from prunekit.tokens.measure import count_flops, measure_paired, measure_throughput

from tests.tokens.conftest import prunekit_vit


def vit_flops(model, batch, tokens_per_block):
    """Hand count for prunekit's ViT: (tokens entering attention, tokens entering the MLP) per block."""
    dim = model.head.in_features
    hidden = model.blocks[0].mlp.fc1.out_features
    patches = model.num_patches
    total = 2 * patches * dim * model.patch_embed.kernel_size[0] ** 2  # the patch-embedding convolution
    for n_attention, n_mlp in tokens_per_block:
        total += 2 * n_attention * dim * 3 * dim + 2 * n_attention * dim * dim  # qkv and output projections
        total += 2 * 2 * n_attention * n_attention * dim  # q k^T and attention @ v
        total += 2 * 2 * n_mlp * dim * hidden  # fc1 and fc2
    total += 2 * dim * model.head.out_features
    return batch * total


def test_flops_of_linear_layers_and_cpu_attention_are_counted():
    assert count_flops(lambda: nn.Linear(8, 4)(torch.randn(3, 8))) == 2 * 8 * 4 * 3
    q = torch.randn(2, 3, 10, 16)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 2 * 3 * 10 * 10 * 16


def test_vit_flops_match_the_hand_count_before_and_after_pruning():
    model = prunekit_vit(depth=4)
    images = torch.randn(2, 1, 28, 28)
    assert count_flops(lambda: model(images)) == vit_flops(model, 2, [(50, 50)] * 4)
    with apply(model, "fastv", rate=0.5, layers=[1]):
        measured = count_flops(lambda: model(images))
    kept = 1 + 49 - 24
    dim, heads = 48, 4
    anchor_row = 2 * 2 * heads * 50 * (dim // heads)  # the [CLS] query against every key, per sample
    assert measured == vit_flops(model, 2, [(50, 50), (50, kept), (kept, kept), (kept, kept)]) + anchor_row


def test_throughput_is_the_batch_over_the_median_time():
    calls = []
    result = measure_throughput(lambda: calls.append(1), batch_size=8, warmup=2, repeats=5)
    assert len(calls) == 7 and len(result.seconds) == 5
    assert result.items_per_second == 8 / result.median_seconds
    assert sorted(result.seconds)[2] == result.median_seconds


def test_paired_timing_alternates_and_cancels_a_drifting_machine():
    """A machine that slows down steadily: paired ABBA timing still finds the true 2x speed-up."""
    now = [0.0]
    state = {"on": False, "passes": 0}
    order = []

    def run():
        state["passes"] += 1
        drift = 1.0 + 0.05 * state["passes"]  # every pass 5 % slower than the first
        now[0] += (1.0 if state["on"] else 2.0) * drift
        order.append(state["on"])

    result = measure_paired(run, batch_size=4, patch_on=lambda: state.update(on=True),
                            patch_off=lambda: state.update(on=False), warmup=1, repeats=6, clock=lambda: now[0])
    assert order == [True, False, False, True] * 3 + [True, False]
    assert state["on"]  # the patch is left on
    assert len(result.seconds) == len(result.baseline_seconds) == 6
    assert abs(result.speedup - 2.0) < 0.12
    assert result.items_per_second == 4 / sorted(result.seconds)[2] or result.items_per_second == 4 / (
        (sorted(result.seconds)[2] + sorted(result.seconds)[3]) / 2)


def test_a_removed_patch_installs_again_and_an_installed_one_is_not_doubled():
    model = prunekit_vit(depth=4).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(images)
        with apply(model, "tome", rate=0.2) as patch:
            reduced = model(images)
            patch.install()  # already installed: nothing changes
            assert torch.equal(model(images), reduced)
            patch.remove()
            assert torch.equal(model(images), plain)
            patch.install()
            assert torch.equal(model(images), reduced)
        assert torch.equal(model(images), plain)

"""FLOP counts of patched models against hand formulas (counted by prunekit.evaluate.measure)."""

import torch

from prunekit.tokens import apply
from prunekit.evaluate.measure import count_flops

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


def test_vit_flops_match_the_hand_count_before_and_after_pruning():
    model = prunekit_vit(depth=4)
    images = torch.randn(2, 1, 28, 28)
    assert count_flops(lambda: model(images)) == vit_flops(model, 2, [(50, 50)] * 4)
    with apply(model, "fastv", ratio=0.5, layers=[1]):
        measured = count_flops(lambda: model(images))
    kept = 1 + 49 - 24
    dim, heads = 48, 4
    anchor_row = 2 * 2 * heads * 50 * (dim // heads)  # the [CLS] query against every key, per sample
    assert measured == vit_flops(model, 2, [(50, 50), (50, kept), (kept, kept), (kept, kept)]) + anchor_row


def test_a_removed_patch_installs_again_and_an_installed_one_is_not_doubled():
    model = prunekit_vit(depth=4).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(images)
        with apply(model, "tome", ratio=0.2) as patch:
            reduced = model(images)
            patch.install()  # already installed: nothing changes
            assert torch.equal(model(images), reduced)
            patch.remove()
            assert torch.equal(model(images), plain)
            patch.install()
            assert torch.equal(model(images), reduced)
        assert torch.equal(model(images), plain)

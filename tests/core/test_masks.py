import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.masks import (
    attach_mask,
    get_mask,
    is_valid_nm,
    keep_mask,
    keep_mask_nm,
    keep_mask_per_row,
    keep_mask_per_tensor,
    pruned_count,
    squash_masks,
)
from prunekit.core.patterns import SparsityPattern

shapes = st.tuples(st.integers(1, 40), st.integers(1, 12))
fractions = st.floats(0.0, 0.99, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(shapes, fractions, st.integers(0, 2**16))
def test_per_row_prunes_the_exact_count_in_every_row(shape, sparsity, seed):
    rows, cols = shape[0], shape[1] * 4
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = keep_mask_per_row(scores, sparsity)
    assert ((~mask).sum(dim=1) == pruned_count(cols, sparsity)).all()
    # every dropped score is at most every kept score of its row
    for row in range(rows):
        if (~mask[row]).any() and mask[row].any():
            assert scores[row][~mask[row]].max() <= scores[row][mask[row]].min()


@settings(max_examples=60, deadline=None)
@given(shapes, fractions, st.integers(0, 2**16))
def test_per_tensor_prunes_the_exact_count(shape, sparsity, seed):
    scores = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(seed)).float()  # many ties
    mask = keep_mask_per_tensor(scores, sparsity)
    assert int((~mask).sum()) == pruned_count(scores.numel(), sparsity)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10), st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 8), (2, 8)]),
       st.integers(0, 2**16))
def test_nm_masks_are_valid_and_keep_the_largest(rows, groups, nm, seed):
    pattern = SparsityPattern(*nm)
    scores = torch.rand(rows, groups * pattern.m, generator=torch.Generator().manual_seed(seed))
    mask = keep_mask_nm(scores, pattern)
    assert is_valid_nm(mask, pattern)
    per_group = mask.reshape(rows, groups, pattern.m).sum(-1)
    assert (per_group == pattern.n).all()
    kept = scores.reshape(rows, groups, pattern.m) * mask.reshape(rows, groups, pattern.m)
    dropped = scores.reshape(rows, groups, pattern.m).masked_fill(mask.reshape(rows, groups, pattern.m), -1)
    assert (dropped.max(-1).values <= kept.masked_fill(kept == 0, 2).min(-1).values).all()


def test_invalid_nm_detected():
    mask = torch.tensor([[True, True, True, False]])
    assert not is_valid_nm(mask, SparsityPattern(2, 4))
    assert is_valid_nm(torch.tensor([[True, False, True, False]]), SparsityPattern(2, 4))


def test_keep_mask_dispatch():
    scores = torch.rand(4, 8)
    assert is_valid_nm(keep_mask(scores, 0.5, SparsityPattern(2, 4), per_row=False), SparsityPattern(2, 4))


def test_mask_parametrization_masks_forward_and_gradients_then_squashes():
    layer = torch.nn.Linear(6, 3)
    mask = torch.rand(3, 6) > 0.5
    attach_mask(layer, mask)
    assert torch.equal(layer.weight == 0, ~mask | (layer.parametrizations.weight.original == 0))
    layer(torch.randn(5, 6)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.all(grad[~mask] == 0)
    # a second attach replaces the mask instead of stacking parametrizations
    attach_mask(layer, torch.ones(3, 6, dtype=torch.bool))
    assert len(layer.parametrizations.weight) == 1
    assert get_mask(layer).mask.all()
    attach_mask(layer, mask)
    assert squash_masks(layer) == 1
    assert not hasattr(layer, "parametrizations")
    assert torch.all(layer.weight[~mask] == 0)

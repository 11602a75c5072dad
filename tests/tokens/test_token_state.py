"""Packing, merging and masking of the token state: the bookkeeping every method relies on."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.tokens.base import DROPPED, FUSED, Assignment, Selection
from prunekit.tokens.state import TokenState, apply_assignment, apply_selection, pool_mean


def state_with(valid):
    state = TokenState.initial(valid.shape[0], valid.shape[1], torch.device("cpu"), valid=valid)
    state.protected = torch.zeros_like(valid)
    state.protected[:, 0] = True
    return state


def test_selection_packs_survivors_in_order_and_pads_shorter_rows_after_them():
    valid = torch.tensor([[True, True, True, True, True], [True, True, True, False, False]])
    hidden = torch.arange(10.0).view(2, 5, 1)
    keep = torch.tensor([[True, False, True, False, True], [False, True, False, True, True]])
    new_hidden, new = apply_selection(hidden, state_with(valid), Selection(keep))
    # protected token 0 of row 1 survives although not kept; padding (3, 4 of row 1) never does
    assert new.source.tolist() == [[0, 2, 4], [0, 1, -1]]
    assert new.valid.tolist() == [[True, True, True], [True, True, False]]
    assert new_hidden[..., 0].tolist()[0] == [0.0, 2.0, 4.0] and new_hidden[1, :2, 0].tolist() == [5.0, 6.0]
    assert new.sizes.tolist() == [[1, 1, 1], [1, 1, 0]] and new.padded


def test_right_alignment_keeps_each_rows_last_real_token_last():
    valid = torch.ones(2, 6, dtype=torch.bool)
    hidden = torch.arange(12.0).view(2, 6, 1)
    keep = torch.tensor([[True, False, False, True, False, True], [True, True, True, False, True, True]])
    _, new = apply_selection(hidden, state_with(valid), Selection(keep), align_right=True)
    assert new.source.tolist() == [[-1, -1, 0, 3, 5], [0, 1, 2, 4, 5]]
    assert new.valid.tolist() == [[False, False, True, True, True], [True] * 5]


def test_assignment_averages_by_size_fuses_and_drops():
    state = state_with(torch.ones(1, 6, dtype=torch.bool))
    state.sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0]])
    hidden = torch.randn(1, 6, 4)
    dest = torch.tensor([[0, 1, 1, FUSED, FUSED, DROPPED]])
    weights = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.6, 0.0]])
    new_hidden, new = apply_assignment(hidden, state, Assignment(dest, weights))
    assert new.source.tolist() == [[0, 1, -1]] and new.sizes.tolist() == [[1.0, 3.0, 4.0]]
    assert torch.equal(new_hidden[0, 0], hidden[0, 0])
    assert torch.allclose(new_hidden[0, 1], (2 * hidden[0, 1] + hidden[0, 2]) / 3)
    assert torch.allclose(new_hidden[0, 2], (0.2 * hidden[0, 3] + 0.6 * hidden[0, 4]) / 0.8)
    assert new.merged and not new.protected[0, 2]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_merging_preserves_the_total_size_of_kept_and_merged_tokens(data):
    batch = data.draw(st.integers(1, 3))
    tokens = data.draw(st.integers(2, 12))
    lengths = [data.draw(st.integers(1, tokens)) for _ in range(batch)]
    valid = torch.tensor([[i < length for i in range(tokens)] for length in lengths])
    state = state_with(valid)
    state.sizes = torch.tensor([[data.draw(st.integers(1, 5)) * float(v) for v in row] for row in valid.tolist()])
    dest = torch.empty(batch, tokens, dtype=torch.long)
    for b, length in enumerate(lengths):
        survivors = [0] + [i for i in range(1, length) if data.draw(st.booleans())]
        for i in range(tokens):
            dest[b, i] = i if i in survivors else data.draw(st.sampled_from(survivors + [FUSED]))
    new_hidden, new = apply_assignment(torch.randn(batch, tokens, 3), state, Assignment(dest, torch.rand(batch, tokens)))
    assert torch.allclose(new.sizes.sum(dim=1), state.sizes.sum(dim=1))
    assert torch.isfinite(new_hidden).all()
    assert (new.sizes[~new.valid] == 0).all() and (new.sizes[new.valid] >= 1).all()


def test_key_bias_appears_only_when_padding_or_merged_sizes_need_it():
    state = state_with(torch.ones(1, 3, dtype=torch.bool))
    assert state.key_bias(torch.float32) is None
    state.proportional, state.merged = True, True
    state.sizes = torch.tensor([[1.0, 4.0, 2.0]])
    assert torch.allclose(state.key_bias(torch.float32)[0, 0, 0], torch.log(torch.tensor([1.0, 4.0, 2.0])))
    padded = state_with(torch.tensor([[True, True, False]]))
    bias = padded.key_bias(torch.float32)[0, 0, 0]
    assert bias[:2].tolist() == [0.0, 0.0] and bias[2] == torch.finfo(torch.float32).min


def test_mean_pooling_of_an_unreduced_state_is_the_masked_mean():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    hidden = torch.randn(2, 3, 4)
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert torch.allclose(pool_mean(hidden, state_with(valid)), expected)

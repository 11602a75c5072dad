"""Each method's choice on hand-built attention and features matches its definition."""

import math

import numpy as np
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.tokens import get_method
from prunekit.tokens.attention import AttentionView
from prunekit.tokens.base import FUSED, ReductionStep, keep_top
from prunekit.tokens.methods.divprune import max_min_diverse
from prunekit.tokens.methods.zero_tprune import weighted_pagerank
from prunekit.tokens.state import TokenState, apply_reduction


def make_state(batch, tokens, valid=None, protect_first=True):
    state = TokenState.initial(batch, tokens, torch.device("cpu"), valid=valid)
    if protect_first:
        state.protected = torch.zeros_like(state.valid)
        state.protected[:, 0] = True
    return state


def step_for(state, attention, remove, hidden=None, anchor="first", seed=0):
    batch, tokens = state.valid.shape
    hidden = torch.randn(batch, tokens, 4) if hidden is None else hidden
    return ReductionStep(hidden=hidden, state=state, attention=attention, remove=torch.as_tensor(remove),
                         layer=0, generator=torch.Generator().manual_seed(seed), anchor=anchor)


def test_keep_top_keeps_protected_drops_padding_and_breaks_ties_towards_earlier_tokens():
    valid = torch.tensor([[True, True, True, True, True, False]])
    state = make_state(1, 6, valid)
    scores = torch.tensor([[-5.0, 1.0, 1.0, 3.0, 0.0, 9.0]])
    keep = keep_top(scores, step_for(state, None, [2])).keep
    # [CLS] (protected, lowest score) stays; padding (highest score) goes; of the tie 1 == 2, token 1 wins.
    assert keep.tolist() == [[True, True, False, True, False, False]]


def test_evit_keeps_the_most_attended_tokens_and_fuses_the_rest_by_attention():
    state = make_state(1, 6)
    probabilities = torch.full((1, 2, 6, 6), 1 / 6)
    probabilities[0, 0, 0] = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.1, 0.05])
    probabilities[0, 1, 0] = torch.tensor([0.1, 0.2, 0.15, 0.3, 0.2, 0.05])  # mean: .1 .3 .1 .3 .15 .05
    view = AttentionView.from_probabilities(probabilities, torch.zeros(1, 2, 6, 4), state)
    hidden = torch.arange(6.0).repeat_interleave(3).view(1, 6, 3)
    method = get_method("evit", ratio=0.4)  # removes floor(0.4 * 5) = 2 of the 5 reducible tokens
    step = step_for(state, view, method.removal_counts(state.reducible.sum(1), 0), hidden=hidden)
    result = method.reduce(step)
    assert result.dest.tolist() == [[0, 1, FUSED, 3, FUSED, FUSED]]
    new_hidden, new_state = apply_reduction(hidden, state, result)
    assert new_state.source.tolist() == [[0, 1, 3, -1]]
    assert new_state.sizes.tolist() == [[1.0, 1.0, 1.0, 3.0]]
    fused = (0.1 * 2 + 0.15 * 4 + 0.05 * 5) / 0.3
    assert torch.allclose(new_hidden[0, 3], torch.full((3,), fused))
    assert torch.equal(new_hidden[0, :3], hidden[0, [0, 1, 3]])


def test_evit_needs_no_fusion_when_nothing_is_removed():
    state = make_state(1, 4)
    view = AttentionView.from_probabilities(torch.full((1, 1, 4, 4), 0.25), torch.zeros(1, 1, 4, 2), state)
    result = get_method("evit", ratio=0.2).reduce(step_for(state, view, [0]))
    assert result.dest.tolist() == [[0, 1, 2, 3]]


def test_fastv_ranks_by_the_last_query_under_a_causal_mask():
    state = make_state(1, 5)
    state.protected[0, -1] = True
    probabilities = torch.zeros(1, 1, 5, 5)
    for query in range(5):
        probabilities[0, 0, query, : query + 1] = 1 / (query + 1)
    probabilities[0, 0, 4] = torch.tensor([0.4, 0.05, 0.3, 0.05, 0.2])
    view = AttentionView.from_probabilities(probabilities, torch.zeros(1, 1, 5, 2), state, causal=True)
    keep = get_method("fastv", ratio=0.5).reduce(step_for(state, view, [1], anchor="last")).keep
    # reducible: 1, 2, 3 -> drop one: token 1 and 3 tie at 0.05, the earlier token wins the tie.
    assert keep.tolist() == [[True, True, True, False, True]]


def test_attention_magnitude_averages_over_real_queries_and_heads():
    valid = torch.tensor([[True, True, True, True, False]])
    state = make_state(1, 5, valid)
    probabilities = torch.rand(1, 2, 5, 5)
    probabilities[..., 4] = 0
    probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    probabilities[:, :, 4] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # a padding query must not count
    view = AttentionView.from_probabilities(probabilities, torch.zeros(1, 2, 5, 2), state)
    by_hand = probabilities[0, :, :4, :4].mean(dim=0).mean(dim=0)  # heads, then the four real queries
    assert torch.allclose(view.received()[0, :4], by_hand)
    order = sorted(range(1, 4), key=lambda token: -float(by_hand[token]))
    keep = get_method("attention-magnitude", ratio=0.5).reduce(step_for(state, view, [1])).keep
    assert keep[0, 0] and not keep[0, 4]
    assert keep[0, order[:2]].all() and not keep[0, order[2]]


def test_attention_magnitude_under_a_causal_mask_divides_by_the_queries_that_see_a_key():
    state = make_state(1, 4, protect_first=False)
    probabilities = torch.tril(torch.rand(1, 1, 4, 4)) + 0.0
    probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    view = AttentionView.from_probabilities(probabilities, torch.zeros(1, 1, 4, 2), state, causal=True)
    by_hand = torch.stack([probabilities[0, 0, key:, key].sum() / (4 - key) for key in range(4)])
    assert torch.allclose(view.received()[0], by_hand)


def test_weighted_pagerank_is_the_stationary_distribution_of_each_head():
    chain = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    probabilities = chain[None, None].repeat(1, 2, 1, 1)
    score = weighted_pagerank(probabilities, torch.ones(1, 3, dtype=torch.bool), iterations=200)
    assert torch.allclose(score[0], torch.tensor([0.25, 0.5, 0.25]), atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    heads = torch.softmax(torch.randn(1, 3, 6, 6, generator=generator) * 2, dim=-1)
    score = weighted_pagerank(heads, torch.ones(1, 6, dtype=torch.bool), iterations=300)
    expected = []
    for head in heads[0].double().numpy():
        values, vectors = np.linalg.eig(head.T)
        vector = np.real(vectors[:, np.argmin(abs(values - 1))])
        expected.append(vector / vector.sum())
    assert np.allclose(score[0].numpy(), np.mean(expected, axis=0), atol=1e-5)


def test_weighted_pagerank_gives_padding_no_importance_and_keeps_the_total():
    valid = torch.tensor([[True, True, True, False]])
    probabilities = torch.rand(1, 1, 4, 4)
    probabilities[..., 3] = 0
    probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    score = weighted_pagerank(probabilities, valid, iterations=10)
    assert score[0, 3] == 0 and math.isclose(float(score.sum()), 1.0, rel_tol=1e-5)


def test_zero_tprune_similarity_stage_prunes_the_token_redundant_with_an_important_one():
    # importance (PageRank of a rank-one graph = its row): 1 > 4 > 2 > 3, so 1 and 4 form the important half;
    # token 2 copies token 1's key, token 3 is the least important but unlike any important token.
    state = make_state(1, 5)
    probabilities = torch.tensor([[0.05, 0.5, 0.12, 0.1, 0.23]]).repeat(5, 1)[None, None]
    keys = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, -1.0], [1.0, 0.0]])[None, None]
    view = AttentionView.from_probabilities(probabilities, keys, state)
    keep = get_method("zero-tprune", ratio=0.25, importance_share=0.0).reduce(step_for(state, view, [1])).keep
    assert keep.tolist() == [[True, True, False, True, True]]
    # by importance alone, the least important token (3) goes instead
    keep = get_method("zero-tprune", ratio=0.25, importance_share=1.0).reduce(step_for(state, view, [1])).keep
    assert keep.tolist() == [[True, True, True, False, True]]


def _greedy_reference(features, count):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distance = 1 - unit @ unit.T
    n = len(features)
    nearest = [min(distance[i, j] for j in range(n) if j != i) if n > 1 else math.inf for i in range(n)]
    chosen = [int(np.argmax(nearest))]
    while len(chosen) < count:
        gains = [min(distance[c, j] for c in chosen) if j not in chosen else -math.inf for j in range(n)]
        chosen.append(int(np.argmax(gains)))
    return set(chosen)


def test_divprune_is_the_greedy_max_min_choice_per_sample_ignoring_padding():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 9, 5, generator=generator)
    lengths = [9, 6, 4]
    candidates = torch.tensor([[i < length for i in range(9)] for length in lengths])
    counts = torch.tensor([5, 3, 4])
    chosen = max_min_diverse(features, candidates, counts)
    for row, (length, count) in enumerate(zip(lengths, counts.tolist())):
        expected = _greedy_reference(features[row, :length].numpy().astype(np.float64), count)
        assert set(torch.nonzero(chosen[row]).flatten().tolist()) == expected


def test_divprune_drops_a_duplicate_rather_than_a_distinct_token():
    state = make_state(1, 5)
    hidden = torch.tensor([[[9.0, 9, 9], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]])
    keep = get_method("divprune", ratio=0.25).reduce(step_for(state, None, [1], hidden=hidden)).keep
    assert keep[0, 0] and keep[0, 3] and keep[0, 4] and int(keep[0, 1]) + int(keep[0, 2]) == 1


def test_tome_merges_each_a_token_into_its_most_similar_b_token():
    state = make_state(1, 7)  # [CLS] + six tokens: A = 1, 3, 5 and B = 2, 4, 6 (alternating)
    keys = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0], [0.1, 1, 0], [1, 0, 0.01], [0, 0, 1], [1, 1, 1]])
    view = AttentionView.from_probabilities(torch.zeros(1, 1, 7, 7), keys[None, None], state)
    hidden = torch.randn(1, 7, 3)
    state.sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 4.0]])
    result = get_method("tome", ratio=0.4).reduce(step_for(state, view, [2], hidden=hidden))
    # token 1 matches 4 (cos ~1), token 3 matches 2 (cos ~0.995), token 5 matches 6 (cos 0.58): the best two merge.
    assert result.dest.tolist() == [[0, 4, 2, 2, 4, 5, 6]]
    new_hidden, new_state = apply_reduction(hidden, state, result)
    assert new_state.source.tolist() == [[0, 2, 4, 5, 6]]
    assert new_state.sizes.tolist() == [[1.0, 4.0, 3.0, 1.0, 4.0]]
    assert torch.allclose(new_hidden[0, 1], (1 * hidden[0, 2] + 3 * hidden[0, 3]) / 4)
    assert torch.allclose(new_hidden[0, 2], (2 * hidden[0, 1] + 1 * hidden[0, 4]) / 3)
    assert torch.equal(new_hidden[0, [0, 3, 4]], hidden[0, [0, 5, 6]])


def test_tome_merges_at_most_half_and_honours_r():
    method = get_method("tome", ratio=0.5)
    assert method.removal_counts(torch.tensor([7, 2, 1]), 0).tolist() == [3, 1, 0]
    assert get_method("tome", ratio=0.0, r=5).removal_counts(torch.tensor([20, 6]), 0).tolist() == [5, 3]


def test_random_is_reproducible_for_a_seed_and_differs_across_seeds():
    state = make_state(2, 30)
    method = get_method("random", ratio=0.5)
    first = method.reduce(step_for(state, None, [14, 14], seed=1)).keep
    again = method.reduce(step_for(state, None, [14, 14], seed=1)).keep
    other = method.reduce(step_for(state, None, [14, 14], seed=2)).keep
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first[:, 0].all() and first.sum(dim=1).tolist() == [16, 16]


@pytest.mark.parametrize("name,ratio,message", [
    ("tome", 0.6, "at most 50%"),
    ("evit", 1.0, "would remove every token"),
    ("random", 1.5, "would remove every token"),
    ("random", -0.1, "greater than or equal to 0"),
    ("zero-tprune", 0.3, None),
])
def test_ratios_are_validated(name, ratio, message):
    if message is None:
        assert get_method(name, ratio).ratio == ratio
        return
    with pytest.raises(PrunekitError, match=message):
        get_method(name, ratio)


def test_unknown_methods_and_settings_are_named():
    with pytest.raises(PrunekitError, match="unknown token method 'tomme'; choose one of: attention-magnitude"):
        get_method("tomme", 0.1)
    with pytest.raises(PrunekitError, match="tome has no setting 'iterations'; its settings are: proportional, r, ratio$"):
        get_method("tome", 0.1, iterations=3)
    with pytest.raises(PrunekitError, match="zero-tprune: iterations"):
        get_method("zero-tprune", 0.1, iterations=0)


def test_tomes_rectangular_shortcut_merges_exactly_like_the_general_path():
    generator = torch.Generator().manual_seed(7)
    state = make_state(3, 17)
    state.find_protected_prefix()
    state.sizes = torch.randint(1, 4, (3, 17), generator=generator).float()
    keys = torch.randn(3, 2, 17, 5, generator=generator)
    hidden = torch.randn(3, 17, 6, generator=generator)
    view = AttentionView.from_probabilities(torch.zeros(3, 2, 17, 17), keys, state)
    method = get_method("tome", ratio=0.4)
    step = step_for(state, view, method.removal_counts(state.reducible.sum(1), 0), hidden=hidden)
    fast_hidden, fast = method.reduce_fast(step)
    slow_hidden, slow = apply_reduction(hidden, state, method.reduce(step))
    assert fast.source[:, 0].tolist() == [0, 0, 0] and fast.protected_prefix == 1
    for row in range(3):
        fast_order, slow_order = fast.source[row].argsort(), slow.source[row].argsort()
        assert torch.equal(fast.source[row, fast_order], slow.source[row, slow_order])
        assert torch.equal(fast.sizes[row, fast_order], slow.sizes[row, slow_order])
        assert torch.allclose(fast_hidden[row, fast_order], slow_hidden[row, slow_order], atol=1e-6)
    padded = make_state(1, 5, torch.tensor([[True, True, True, True, False]]))
    padded.find_protected_prefix()
    assert method.reduce_fast(step_for(padded, view, [1])) is None


def test_methods_are_built_through_the_one_registry():
    from prunekit.tokens import METHODS

    built = METHODS.build({"name": "tome", "ratio": 0.3, "r": 2})
    assert built == get_method("tome", 0.3, r=2) == get_method({"tome": {"ratio": 0.3, "r": 2}})
    assert built.settings() == {"name": "tome", "ratio": 0.3, "r": 2, "proportional": True}
    with pytest.raises(PrunekitError, match="^tome removes at most 50% of the tokens per layer; give a ratio <= 0.5"):
        METHODS.build({"name": "tome", "ratio": 0.7})


def test_the_old_name_rate_is_read_with_a_warning(capsys):
    assert get_method("evit", rate=0.3).ratio == 0.3
    assert "'rate' is deprecated and goes in the next release; use 'ratio'" in capsys.readouterr().err
    with pytest.raises(PrunekitError, match="give 'ratio' or its old name 'rate', not both"):
        get_method("evit", 0.3, rate=0.3)

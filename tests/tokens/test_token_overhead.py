"""The cheap paths of the token patch (issue 17, item 5) give what the general paths give, to the bit, and a block
that removes nothing does no work of the patch's."""

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prunekit.tokens import apply
from prunekit.tokens.base import DROPPED, FUSED, Assignment, Selection
from prunekit.tokens.state import TokenState, _assign_unpadded, _select_unpadded, apply_assignment, apply_selection

from tests.tokens.conftest import hf_vit, prunekit_vit, tiny_bert


def merged_state(batch: int, tokens: int, seed: int, protect_last: bool = False) -> TokenState:
    """An unpadded state after some merging: sizes of 1 to 4, [CLS] (and maybe the last token) protected."""
    generator = torch.Generator().manual_seed(seed)
    state = TokenState.initial(batch, tokens, torch.device("cpu"))
    state.sizes = torch.randint(1, 5, (batch, tokens), generator=generator).float()
    state.protected = torch.zeros(batch, tokens, dtype=torch.bool)
    state.protected[:, 0] = True
    if protect_last:
        state.protected[:, -1] = True
    state.merged = True
    state.find_protected_prefix()
    state.reducible_per_row()  # counted, so that the unpadded paths carry it over
    return state


def general(state: TokenState) -> TokenState:
    """The same state, flagged padded: the general path runs (every row is still real)."""
    return replace(state, padded=True)


def assert_same(fast, slow):
    assert fast is not None, "the unpadded path declined"
    (fast_hidden, fast_state), (slow_hidden, slow_state) = fast, slow
    assert torch.equal(fast_hidden, slow_hidden)
    for name in ("sizes", "valid", "protected", "source"):
        assert torch.equal(getattr(fast_state, name), getattr(slow_state, name)), name
    assert fast_state.merged == slow_state.merged and not fast_state.padded and not slow_state.padded
    # the reducible count a fast path carries over is the one counting gives
    carried = fast_state.reducible_per_row()
    assert carried == int(fast_state.reducible.sum(dim=1)[0]) and bool((fast_state.reducible.sum(dim=1) == carried).all())


def random_rows(batch: int, tokens: int, count: int, seed: int) -> torch.Tensor:
    """(batch, tokens) bool with ``count`` True per row, never the first or last position (protected in places)."""
    scores = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed))
    scores[:, [0, -1]] = -1.0
    chosen = torch.zeros(batch, tokens, dtype=torch.bool)
    return chosen.scatter_(1, scores.topk(count, dim=1).indices, True)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_dropping_without_padding_equals_the_general_packing(batch, seed):
    state = merged_state(batch, 17, seed, protect_last=seed % 2 == 1)
    hidden = torch.randn(batch, 17, 8, generator=torch.Generator().manual_seed(seed))
    keep = random_rows(batch, 17, 9, seed)
    for align_right in (False, True):
        assert_same(_select_unpadded(hidden, state, keep | state.protected),
                    apply_selection(hidden, general(state), Selection(keep), align_right))
        assert_same(apply_selection(hidden, state, Selection(keep), align_right),
                    apply_selection(hidden, general(state), Selection(keep), align_right))


def test_rows_keeping_different_counts_take_the_general_path():
    state = merged_state(2, 6, 0)
    hidden = torch.randn(2, 6, 4)
    keep = torch.tensor([[True, True, False, True, False, True], [True, False, False, False, True, False]])
    new_hidden, new = apply_selection(hidden, state, Selection(keep))
    assert new.valid.tolist() == [[True] * 4, [True, True, False, False]] and new.padded
    assert torch.equal(new_hidden[1, :2], hidden[1, [0, 4]])


def tome_like(batch: int, tokens: int, merges: int, seed: int) -> torch.Tensor:
    """Destinations where ``merges`` odd tokens of each row merge into even survivors (position 0 excluded)."""
    generator = torch.Generator().manual_seed(seed)
    dest = torch.arange(tokens).repeat(batch, 1)
    odd = torch.arange(1, tokens - 2, 2)  # the last odd token is left alone (the fusion test drops it)
    even = torch.arange(2, tokens, 2)
    for row in range(batch):
        movers = odd[torch.randperm(len(odd), generator=generator)[:merges]]
        dest[row, movers] = even[torch.randint(len(even), (merges,), generator=generator)]
    return dest


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_merging_without_padding_equals_the_general_merge(batch, seed):
    state = merged_state(batch, 17, seed)
    hidden = torch.randn(batch, 17, 8, generator=torch.Generator().manual_seed(seed + 10))
    dest = tome_like(batch, 17, 5, seed)
    assert_same(_assign_unpadded(hidden, state, Assignment(dest)),
                apply_assignment(hidden, general(state), Assignment(dest)))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_merges", [False, True])
def test_fusing_without_padding_equals_the_general_fusion(batch, seed, with_merges):
    state = merged_state(batch, 17, seed, protect_last=True)
    generator = torch.Generator().manual_seed(seed + 20)
    hidden = torch.randn(batch, 17, 8, generator=generator)
    dest = tome_like(batch, 17, 3, seed) if with_merges else torch.arange(17).repeat(batch, 1)
    # two tokens of every row fuse: the first two odd ones that neither merge nor are the last odd one
    eligible = (dest == torch.arange(17)) & (torch.arange(17) % 2 == 1) & (torch.arange(17) < 15)
    dest = torch.where(eligible & (eligible.cumsum(dim=1) <= 2), FUSED, dest)
    if with_merges:
        dest[:, 15] = DROPPED  # a dropped token besides
    weights = torch.rand(batch, 17, generator=generator).clamp_min(1e-12)
    assignment = Assignment(dest, fuse_weights=weights)
    assert_same(_assign_unpadded(hidden, state, assignment), apply_assignment(hidden, general(state), assignment))


class OperationCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations(run) -> int:
    counter = OperationCount()
    with torch.no_grad(), counter:
        run()
    return counter.count


@pytest.mark.parametrize("method", ["tome", "evit", "zero-tprune"])
@pytest.mark.parametrize("kind", ["prunekit-vit", "hf-vit", "bert"])
def test_a_zero_ratio_adds_no_work_per_block(kind, method):
    """At a ratio of 0 every block runs as unpatched: the patched model dispatches no tensor operation more per
    block (a pass adds a fixed few at most, for reading the padding mask), whatever the depth."""
    extra = {}
    for depth in (2, 4):
        if kind == "prunekit-vit":
            model, inputs = prunekit_vit(depth=depth), (torch.randn(1, 1, 28, 28),)
        elif kind == "hf-vit":
            model, inputs = hf_vit(layers=depth), (torch.randn(1, 1, 28, 28),)
        else:
            model, inputs = tiny_bert(layers=depth), (torch.randint(5, 500, (1, 20)), torch.ones(1, 20, dtype=torch.long))
        run = lambda: model(*inputs)  # noqa: E731
        with torch.no_grad():
            expected = run()
            unpatched = operations(run)
            with apply(model, method, 0.0, layers=list(range(depth))) as patch:
                got = run()
                operations(run)  # the first pass of a shape builds its state; later passes reuse it
                extra[depth] = operations(run) - unpatched
                assert patch.trace.steps == []
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
    assert extra[2] == extra[4] <= 3, extra


def test_a_kept_initial_state_follows_the_protected_ids_of_each_input():
    """Initial states are reused between passes of one shape; with ``protect_ids`` only for the same token ids."""
    model = tiny_bert()
    ids = torch.randint(8, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    marked = ids.clone()
    marked[0, 5] = 7
    with torch.no_grad(), apply(model, "random", 0.0, protect_ids=[7]) as patch:
        for inputs, protected in ((marked, True), (ids, False), (ids, False), (marked, True)):
            model(input_ids=inputs)
            assert bool(patch.state.protected[0, 5]) is protected


def test_kept_positions_are_a_copy():
    model = prunekit_vit()
    with torch.no_grad(), apply(model, "tome", 0.0) as patch:
        model(torch.randn(1, 1, 28, 28))
        patch.kept_positions().fill_(-5)
        model(torch.randn(1, 1, 28, 28))
        assert patch.kept_positions()[0].tolist() == list(range(50))

"""The tokens of one forward pass as they shrink: sizes, padding, protection and origin of each token.

Reductions keep the batch rectangular: every sample keeps its own number of real tokens, packed
in their original order at the front, and the rest of the row is padding that no attention sees.
Padding is therefore never kept in place of a real token, and a sample's result does not depend on
what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunekit.tokens.base import DROPPED, FUSED, Assignment, Selection

FUSED_SOURCE = -1  # ``source`` of a token that stands for a fusion, not for one original position
_UNKNOWN = -1  # ``TokenState._reducible_per_row`` not counted yet


@dataclass
class TokenState:
    sizes: torch.Tensor  # (batch, tokens) float32: how many original tokens each token stands for
    valid: torch.Tensor  # (batch, tokens) bool: False for padding
    protected: torch.Tensor  # (batch, tokens) bool: never dropped or merged ([CLS], special tokens, ...)
    source: torch.Tensor  # (batch, tokens) long: original index of each token (FUSED_SOURCE for a fusion)
    reduced: bool = False  # whether any token has been removed in this forward pass
    proportional: bool = False  # whether attention adds log(size) to its logits (ToMe)
    padded: bool = False  # whether any row holds padding
    merged: bool = False  # whether any token stands for more than one original token
    protected_prefix: int | None = None  # when the protected tokens are exactly each row's first k: k
    _bias: dict = field(default_factory=dict, repr=False, compare=False)  # key_bias per dtype
    # reducible tokens of every row when all rows have the same count, None when they differ, UNKNOWN until asked
    _reducible_per_row: int | None = field(default=-1, repr=False, compare=False)

    def find_protected_prefix(self) -> None:
        counts = self.protected.sum(dim=1)
        prefix = int(counts[0]) if counts.numel() else 0
        is_prefix = bool((counts == prefix).all()) and bool(self.protected[:, :prefix].all())
        self.protected_prefix = prefix if is_prefix else None

    @classmethod
    def initial(cls, batch: int, tokens: int, device: torch.device, valid: torch.Tensor | None = None,
                protected: torch.Tensor | None = None) -> "TokenState":
        if valid is None:
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        if protected is None:
            protected = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        return cls(sizes=valid.to(torch.float32), valid=valid, protected=protected & valid,
                   source=torch.arange(tokens, device=device).expand(batch, tokens).clone(),
                   padded=not bool(valid.all()))

    @property
    def reducible(self) -> torch.Tensor:
        return self.valid & ~self.protected

    @property
    def tokens(self) -> int:
        return self.valid.shape[1]

    def has_padding(self) -> bool:
        return self.padded

    def reducible_per_row(self) -> int | None:
        """The number of reducible tokens of every row when all rows have the same (None when they differ).

        Counted once per state, so that the blocks between two reductions (and every block at a ratio of 0) decide
        how many tokens they remove from a Python integer instead of a reduction over the batch; with no padding and
        only leading protected tokens it needs no tensor work at all."""
        if self._reducible_per_row != _UNKNOWN:
            return self._reducible_per_row
        if not self.padded and self.protected_prefix is not None:
            count: int | None = self.tokens - self.protected_prefix
        else:
            counts = self.reducible.sum(dim=1)
            count = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self._reducible_per_row = count
        return count

    def real_per_row(self) -> float:
        """Real tokens per row, the mean over the batch (the trace's unit); no tensor work without padding."""
        if not self.padded:
            return float(self.tokens)
        return float(self.valid.sum()) / self.valid.shape[0]

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(batch, 1, 1, tokens) additive attention bias: padding masked out, plus log(size) under
        proportional attention. None when neither applies, so attention runs exactly as unpatched.
        Built once per state: the blocks between two reductions share it."""
        proportional = self.proportional and self.merged
        if not proportional and not self.padded:
            return None
        cached = self._bias.get(dtype)
        if cached is not None:
            return cached
        if proportional:
            bias = torch.log(self.sizes.clamp_min(1.0))
        else:
            bias = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        if self.padded:  # without padding there is nothing to mask
            bias = bias.masked_fill(~self.valid, torch.finfo(dtype).min)
        bias = bias.to(dtype)[:, None, None, :]
        self._bias[dtype] = bias
        return bias

    def causal_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, tokens, tokens) additive causal mask over the current tokens (kept in their
        original order), with padding keys masked out."""
        n = self.tokens
        device = self.valid.device
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None] & self.valid[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return bias[:, None]

    def anchor_index(self, anchor: str) -> torch.Tensor:
        """(batch,) index of the token whose attention row ranks the others: the first token
        ([CLS]) or the last real token (a decoder's newest query)."""
        if anchor == "first":
            return torch.zeros(self.valid.shape[0], dtype=torch.long, device=self.valid.device)
        positions = torch.arange(self.tokens, device=self.valid.device).expand_as(self.valid)
        return torch.where(self.valid, positions, -1).amax(dim=1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as an additive bias: a boolean one (True = attend) becomes 0 / the lowest value, a
    float one is already additive. The lowest finite value (not -inf) keeps a row that sees nothing finite."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _packing_order(survivors: torch.Tensor, align_right: bool = False) -> torch.Tensor:
    """(batch, tokens): indices that gather each row's survivors, in their original order, to the
    front of the row (or, with ``align_right``, so that they end the row's first ``max count``)."""
    n = survivors.shape[1]
    positions = torch.arange(n, device=survivors.device)
    key = torch.where(survivors, positions, positions + n)
    order = torch.sort(key, dim=1, stable=True).indices
    if align_right:
        counts = survivors.sum(dim=1, keepdim=True)
        width = counts.max()
        # slot j of a row holds survivor j - (width - count); the leading slots hold padding.
        shift = (positions[None, :] - (width - counts)) % n
        order = order.gather(1, shift)
    return order


def apply_selection(hidden: torch.Tensor, state: TokenState, selection: Selection,
                    align_right: bool = False) -> tuple[torch.Tensor, TokenState]:
    """Drop every token not kept; survivors are packed in order, shorter rows padded (after the
    survivors, or before them with ``align_right`` so a decoder's last token stays last)."""
    if not state.padded:
        packed = _select_unpadded(hidden, state, selection.keep | state.protected)
        if packed is not None:
            return packed
    keep = (selection.keep | state.protected) & state.valid
    counts = keep.sum(dim=1)
    width = int(counts.max())
    index = _packing_order(keep, align_right)[:, :width]
    slots = torch.arange(width, device=keep.device)[None, :]
    valid = slots >= (width - counts)[:, None] if align_right else slots < counts[:, None]
    gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    new_state = TokenState(
        sizes=state.sizes.gather(1, index) * valid,
        valid=valid,
        protected=state.protected.gather(1, index) & valid,
        source=torch.where(valid, state.source.gather(1, index), FUSED_SOURCE),
        reduced=True,
        proportional=state.proportional,
        padded=not bool(valid.all()),
        merged=state.merged,
        protected_prefix=state.protected_prefix,
    )
    return gathered, new_state


def _select_unpadded(hidden: torch.Tensor, state: TokenState, keep: torch.Tensor) -> tuple[torch.Tensor, TokenState] | None:
    """``apply_selection`` for the common case at a fraction of its tensor operations: no row is padded and every
    row keeps as many tokens (always so at batch 1). Then the survivors of row b are the b-th run of ``nonzero``'s
    column indices, already in order, and nothing is padded after the step either; rows that keep different counts
    return None (the general path packs and pads them)."""
    batch = keep.shape[0]
    if batch > 1:
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            return None
    index = keep.nonzero()[:, 1].view(batch, -1)
    width = index.shape[1]
    # protected tokens always survive, so every row keeps as many of them as before
    previous = state._reducible_per_row
    reducible = None if previous is None or previous == _UNKNOWN else width - (state.tokens - previous)
    gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    new_state = TokenState(
        sizes=state.sizes.gather(1, index),
        valid=torch.ones(batch, width, dtype=torch.bool, device=keep.device),
        protected=state.protected.gather(1, index),
        source=state.source.gather(1, index),
        reduced=True,
        proportional=state.proportional,
        padded=False,
        merged=state.merged,
        protected_prefix=state.protected_prefix,
        _reducible_per_row=_UNKNOWN if reducible is None else reducible,
    )
    return gathered, new_state


def apply_assignment(hidden: torch.Tensor, state: TokenState, assignment: Assignment) -> tuple[torch.Tensor, TokenState]:
    """Merge tokens into their destinations (size-weighted mean), fuse the ``FUSED`` ones into one
    extra token appended after the survivors, drop the rest. A survivor nothing merged into keeps
    its hidden state exactly."""
    if not state.padded:
        assigned = _assign_unpadded(hidden, state, assignment)
        if assigned is not None:
            return assigned
    batch, n, width = hidden.shape
    device = hidden.device
    positions = torch.arange(n, device=device)
    dest = torch.where(state.protected, positions, assignment.dest).masked_fill(~state.valid, DROPPED)
    survivors = dest == positions
    moving = (dest >= 0) & ~survivors
    if bool((moving & ~survivors.gather(1, dest.clamp_min(0))).any()):
        raise RuntimeError("a token was merged into a token that does not survive")
    fused = dest == FUSED
    has_fused = fused.any(dim=1)
    kept = survivors.sum(dim=1)
    counts = kept + has_fused.long()
    new_width = int(counts.max())
    order = _packing_order(survivors)
    slot = torch.empty_like(order).scatter_(1, order, positions.expand(batch, n))  # packed slot of each survivor
    dump = new_width  # an extra slot for tokens that go nowhere, cut off at the end
    target = torch.where(dest >= 0, slot.gather(1, dest.clamp_min(0)),
                         torch.where(fused, kept[:, None], torch.full_like(dest, dump)))

    sizes = state.sizes * state.valid
    weights = sizes.to(hidden.dtype)
    if assignment.fuse_weights is not None:
        weights = torch.where(fused, assignment.fuse_weights.to(hidden.dtype), weights)
    weights = weights * (moving | fused)
    incoming = torch.zeros(batch, new_width + 1, width, dtype=hidden.dtype, device=device)
    incoming.scatter_add_(1, target[..., None].expand(-1, -1, width), hidden * weights[..., None])
    incoming_weight = torch.zeros(batch, new_width + 1, dtype=hidden.dtype, device=device).scatter_add_(1, target, weights)
    incoming, incoming_weight = incoming[:, :new_width], incoming_weight[:, :new_width]

    gather_index = order[:, :new_width]
    slots = torch.arange(new_width, device=device)[None, :]
    is_survivor_slot = slots < kept[:, None]
    own = hidden.gather(1, gather_index[..., None].expand(-1, -1, width))
    own_weight = (sizes.gather(1, gather_index) * is_survivor_slot).to(hidden.dtype)
    merged = (own * own_weight[..., None] + incoming) / (own_weight + incoming_weight).clamp_min(
        torch.finfo(hidden.dtype).tiny)[..., None]
    valid = slots < counts[:, None]
    new_hidden = torch.where((incoming_weight > 0)[..., None], merged, own) * valid[..., None]
    new_sizes = torch.zeros(batch, new_width + 1, dtype=torch.float32, device=device).scatter_add_(1, target, sizes)
    new_state = TokenState(
        sizes=new_sizes[:, :new_width] * valid,
        valid=valid,
        protected=state.protected.gather(1, gather_index) & is_survivor_slot,
        source=torch.where(is_survivor_slot, state.source.gather(1, gather_index), FUSED_SOURCE),
        reduced=True,
        proportional=state.proportional,
        padded=not bool(valid.all()),
        merged=True,
        protected_prefix=state.protected_prefix,
    )
    return new_hidden, new_state


def _assign_unpadded(hidden: torch.Tensor, state: TokenState,
                     assignment: Assignment) -> tuple[torch.Tensor, TokenState] | None:
    """``apply_assignment`` for the common case at about half its tensor operations: no row is padded, and every
    row keeps as many survivors and fuses as many tokens (always so at batch 1; None otherwise, for the general
    path). The arithmetic is the general path's, sum for sum in the same order, so the result is the same; only
    the bookkeeping is cheaper: survivors are found by ``nonzero`` (already in order) and slotted by a running
    count instead of a sort, no padding is masked, and a fusion that merges nothing into survivors (EViT) sums
    just the fused tokens instead of scattering every token. The fused token's weights must be positive (EViT's
    attention is clamped above zero; sizes are at least one)."""
    batch, n, width = hidden.shape
    device = hidden.device
    positions = torch.arange(n, device=device)
    dest = torch.where(state.protected, positions, assignment.dest)
    survivors = dest == positions
    fused = dest == FUSED
    kept_per_row, fused_per_row = survivors.sum(dim=1), fused.sum(dim=1)
    if batch > 1 and not bool(((kept_per_row == kept_per_row[0]) & (fused_per_row == fused_per_row[0])).all()):
        return None
    kept, fusing = int(kept_per_row[0]), int(fused_per_row[0])
    moving = (dest >= 0) & ~survivors
    merging = bool(moving.any())
    if merging and bool((moving & ~survivors.gather(1, dest.clamp_min(0))).any()):
        raise RuntimeError("a token was merged into a token that does not survive")
    index = survivors.nonzero()[:, 1].view(batch, kept)
    sizes = state.sizes
    weights = sizes.to(hidden.dtype)
    if assignment.fuse_weights is not None:
        weights = torch.where(fused, assignment.fuse_weights.to(hidden.dtype), weights)
    new_width = kept + (fusing > 0)
    # protected tokens always survive (and the fused token is reducible), so every row keeps its protected count
    previous = state._reducible_per_row
    reducible = None if previous is None or previous == _UNKNOWN else new_width - (n - previous)
    if merging:
        slot = survivors.cumsum(dim=1) - 1  # a survivor's packed slot: how many survivors precede it
        target = torch.where(dest >= 0, slot.gather(1, dest.clamp_min(0)), torch.where(fused, kept, new_width))
        weights = weights * (moving | fused)
        incoming = torch.zeros(batch, new_width + 1, width, dtype=hidden.dtype, device=device)
        incoming.scatter_add_(1, target[..., None].expand(-1, -1, width), hidden * weights[..., None])
        incoming_weight = torch.zeros(batch, new_width + 1, dtype=hidden.dtype, device=device).scatter_add_(
            1, target, weights)
        incoming, incoming_weight = incoming[:, :new_width], incoming_weight[:, :new_width]
        # the fused slot has no own token: any index will do, its own weight is zero
        gather_index = torch.cat([index, index.new_zeros(batch, 1)], dim=1) if fusing else index
        survivor_slot = torch.arange(new_width, device=device) < kept
        own = hidden.gather(1, gather_index[..., None].expand(-1, -1, width))
        own_weight = (sizes.gather(1, gather_index) * survivor_slot).to(hidden.dtype)
        merged = (own * own_weight[..., None] + incoming) / (own_weight + incoming_weight).clamp_min(
            torch.finfo(hidden.dtype).tiny)[..., None]
        new_hidden = torch.where((incoming_weight > 0)[..., None], merged, own)
        new_sizes = torch.zeros(batch, new_width + 1, dtype=torch.float32, device=device).scatter_add_(
            1, target, sizes)[:, :new_width]
        protected = state.protected.gather(1, gather_index) & survivor_slot
        source = torch.where(survivor_slot, state.source.gather(1, gather_index), FUSED_SOURCE)
    else:
        # survivors keep their hidden states and sizes exactly; the fused tokens' weighted sum, accumulated in
        # token order as the general path's scatter does, becomes one token after them
        new_hidden = hidden.gather(1, index[..., None].expand(-1, -1, width))
        new_sizes, protected, source = sizes.gather(1, index), state.protected.gather(1, index), state.source.gather(1, index)
        if fusing:
            members = fused.nonzero()[:, 1].view(batch, fusing)
            member_weights = weights.gather(1, members)
            into_one = members.new_zeros(1, 1, 1).expand(batch, fusing, width)
            total = torch.zeros(batch, 1, width, dtype=hidden.dtype, device=device).scatter_add_(
                1, into_one, hidden.gather(1, members[..., None].expand(-1, -1, width)) * member_weights[..., None])
            total_weight = torch.zeros(batch, 1, dtype=hidden.dtype, device=device).scatter_add_(
                1, into_one[..., 0], member_weights)
            fused_size = torch.zeros(batch, 1, dtype=torch.float32, device=device).scatter_add_(
                1, into_one[..., 0], sizes.gather(1, members))
            new_hidden = torch.cat([new_hidden, total / total_weight.clamp_min(torch.finfo(hidden.dtype).tiny)[..., None]],
                                   dim=1)
            new_sizes = torch.cat([new_sizes, fused_size], dim=1)
            protected = torch.cat([protected, protected.new_zeros(batch, 1)], dim=1)
            source = torch.cat([source, source.new_full((batch, 1), FUSED_SOURCE)], dim=1)
    new_state = TokenState(
        sizes=new_sizes,
        valid=torch.ones(batch, new_width, dtype=torch.bool, device=device),
        protected=protected,
        source=source,
        reduced=True,
        proportional=state.proportional,
        padded=False,
        merged=True,
        protected_prefix=state.protected_prefix,
        _reducible_per_row=_UNKNOWN if reducible is None else reducible,
    )
    return new_hidden, new_state


def apply_reduction(hidden: torch.Tensor, state: TokenState, result: Selection | Assignment,
                    align_right: bool = False) -> tuple[torch.Tensor, TokenState]:
    if isinstance(result, Selection):
        return apply_selection(hidden, state, result, align_right)
    if align_right:
        raise ValueError("merging keeps survivors at the front of each row; it cannot align them right")
    return apply_assignment(hidden, state, result)


def pool_mean(hidden: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Mean of the real tokens weighted by how many original tokens each stands for: equal to plain
    mean pooling of the unreduced sequence when nothing was removed."""
    weights = (state.sizes * state.valid).to(hidden.dtype)
    return (hidden * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1e-9)

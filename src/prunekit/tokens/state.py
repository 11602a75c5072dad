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
        bias = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        if proportional:
            bias = torch.log(self.sizes.clamp_min(1.0))
        bias = bias.masked_fill(~self.valid, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
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


def apply_assignment(hidden: torch.Tensor, state: TokenState, assignment: Assignment) -> tuple[torch.Tensor, TokenState]:
    """Merge tokens into their destinations (size-weighted mean), fuse the ``FUSED`` ones into one
    extra token appended after the survivors, drop the rest. A survivor nothing merged into keeps
    its hidden state exactly."""
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

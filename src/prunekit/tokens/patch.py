"""``apply``: patch a model so its layers drop or merge tokens, and the handle that undoes it exactly.

The patch replaces the ``forward`` of the model's layers on the instances (never on the classes)
and adds hooks; removing it deletes exactly those attributes and hooks, so the model is the very
object it was before. Nothing touches a parameter or a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.patching import ReversiblePatch
from prunekit.errors import PrunekitError
from prunekit.tokens.attention import AttentionView
from prunekit.tokens.base import ReductionStep, TokenMethod, get_method
from prunekit.tokens.state import TokenState, apply_reduction, pool_mean

if TYPE_CHECKING:
    from prunekit.tokens.families.base import TokenFamily

_KEPT_STATES = 16  # initial states kept for reuse, one per input shape


@dataclass
class LayerRecord:
    """Tokens per sample (mean over the batch's real tokens) before and after one reducing layer."""

    layer: int
    tokens_before: float
    tokens_after: float


@dataclass
class ForwardTrace:
    """What the last forward pass did: the batch, its tokens at the start and end, every reduction."""

    batch: int = 0
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    steps: list[LayerRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "steps": [vars(step) for step in self.steps]}


class TokenPatch(ReversiblePatch):
    """A token-reduction patch on a model; ``remove()`` (or leaving a ``with`` block) undoes it.

    After a forward pass, ``state`` describes the tokens the model ended with (their sizes, which
    are padding, which original position each stands for) and ``pool`` averages hidden states
    over them, weighted by size, as mean pooling of the unreduced sequence would.
    """

    marker = "_prunekit_token_patch"

    def __init__(self, model: nn.Module, family: "TokenFamily", method: TokenMethod, layers: Sequence[int],
                 seed: int, protect_ids: Sequence[int]):
        super().__init__(model)
        self.family = family
        self.method = method
        self.layers = tuple(sorted(layers))
        self.seed = seed
        self.protect_ids = tuple(int(i) for i in protect_ids)
        self.state: TokenState | None = None
        self.trace = ForwardTrace()
        self._reducing = frozenset(self.layers)
        self._pending: dict[str, Any] | None = None
        self._generator: torch.Generator | None = None
        self._initial_states: dict[tuple, tuple[torch.Tensor | None, TokenState, float]] = {}
        self._removals: dict[tuple, torch.Tensor | None] = {}

    # ----- installing and removing (core.patching) ---------------------------------------------
    def attach(self) -> None:
        self.family.install(self)

    def detached(self) -> None:
        self._pending = None  # the last pass's state stays readable (pool, kept_positions)

    # ----- one forward pass (called by the family's code) ------------------------------------
    def start(self, valid: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> None:
        """A new forward pass begins; its token state is built when the first layer sees its input."""
        self._pending = {"valid": valid, "input_ids": input_ids}
        self.state = None
        self.trace = ForwardTrace()
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)

    def state_for(self, hidden: torch.Tensor) -> TokenState:
        if self._pending is None:
            if self.state is None or self.state.valid.shape != hidden.shape[:2]:
                raise PrunekitError("a patched layer ran outside the model's forward pass; call the model itself")
            return self.state
        pending, self._pending = self._pending, None
        batch, tokens = hidden.shape[:2]
        valid = pending["valid"]
        if valid is not None:
            if valid.shape != (batch, tokens):
                raise PrunekitError(f"the attention mask has shape {tuple(valid.shape)}, but the input has "
                                    f"{batch} sequences of {tokens} tokens")
            valid = valid.to(hidden.device).bool()
            if bool(valid.all()):
                valid = None  # a mask without padding gives the very state no mask gives, which can be reused
            elif not bool(valid.any(dim=1).all()):
                raise PrunekitError("a sequence in the batch is all padding; every sequence needs a real token")
        state, real = self._initial_state(batch, tokens, hidden.device, valid, pending["input_ids"])
        self.state = state
        self.trace = ForwardTrace(batch=batch, tokens_in=real, tokens_out=real)
        return state

    def _initial_state(self, batch: int, tokens: int, device: torch.device, valid: torch.Tensor | None,
                       input_ids: torch.Tensor | None) -> tuple[TokenState, float]:
        """The state a pass starts from, with its real tokens per row. Without padding it depends only on the shape
        (and on the token ids where ``protect_ids`` protect some), so the states of unpadded passes are kept and
        reused: a pass of the same shape then builds nothing before its first block. States are never changed
        once built (every reduction makes a new one), which makes sharing them safe."""
        by_ids = bool(self.protect_ids) and input_ids is not None
        key = (batch, tokens, device, input_ids is None) if valid is None else None
        if key is not None:
            kept = self._initial_states.get(key)
            if kept is not None and (not by_ids or torch.equal(kept[0], input_ids)):
                return kept[1], kept[2]
        state = TokenState.initial(batch, tokens, device, valid=valid)
        state.protected = self.family.protected(state.valid, input_ids, self.protect_ids)
        state.proportional = self.method.uses_proportional_attention()
        state.find_protected_prefix()
        real = state.real_per_row()
        if key is not None:
            if len(self._initial_states) >= _KEPT_STATES:
                self._initial_states.clear()  # text of many lengths: keep memory bounded, not every shape
            self._initial_states[key] = (input_ids.clone() if by_ids else None, state, real)
        return state, real

    def reduces_at(self, layer: int) -> bool:
        return layer in self._reducing

    def removal(self, layer: int, state: TokenState) -> torch.Tensor | None:
        """(batch,) how many reducible tokens each sequence loses at ``layer``; None where no sequence loses any
        (every block but the reducing ones, and all of them at a ratio of 0), so that such a block runs exactly as
        unpatched: its attention is not read and it is not split.

        When every row has as many reducible tokens, the method's count is computed once per (layer, count) and
        kept: methods are frozen once built, so it cannot change while the patch lives."""
        if layer not in self._reducing:
            return None
        per_row = state.reducible_per_row()
        if per_row is None:
            remove = self.method.removal_counts(state.reducible.sum(dim=1), layer)
            return remove if bool((remove > 0).any()) else None
        batch, device = state.valid.shape[0], state.valid.device
        key = (layer, per_row, batch, device)
        if key not in self._removals:
            count = int(self.method.removal_counts(torch.tensor([per_row], device=device), layer)[0])
            self._removals[key] = torch.full((batch,), count, dtype=torch.long, device=device) if count > 0 else None
        return self._removals[key]

    def reduce(self, layer: int, hidden: torch.Tensor, attention: AttentionView,
               remove: torch.Tensor | None = None) -> torch.Tensor:
        """Run the method at a reducing layer; returns the new hidden states and updates ``state``. ``remove`` is
        what ``removal`` said before the block ran (asked here when not given)."""
        state = self.state_for(hidden)
        if remove is None:
            remove = self.removal(layer, state)
            if remove is None:
                return hidden
        step = ReductionStep(hidden=hidden, state=state, attention=attention, remove=remove, layer=layer,
                             generator=self._generator, anchor=self.family.anchor)
        before = state.real_per_row()
        fast = None if self.family.causal else self.method.reduce_fast(step)
        if fast is not None:
            hidden, self.state = fast
        else:
            hidden, self.state = apply_reduction(hidden, state, self.method.reduce(step), align_right=self.family.causal)
        after = self.state.real_per_row()
        self.trace.steps.append(LayerRecord(layer, before, after))
        self.trace.tokens_out = after
        return hidden

    # ----- after a forward pass --------------------------------------------------------------
    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Size-weighted mean of the last forward pass's final tokens (padding excluded)."""
        if self.state is None or self.state.valid.shape != hidden.shape[:2]:
            raise PrunekitError("pool() needs the final hidden states of the last forward pass of the patched model")
        return pool_mean(hidden, self.state)

    def kept_positions(self) -> torch.Tensor:
        """(batch, tokens) original index of every final token of the last forward pass; -1 marks
        padding and fused tokens."""
        if self.state is None:
            raise PrunekitError("kept_positions() needs a forward pass of the patched model first")
        return self.state.source.clone()  # a copy: the state may be reused by the next pass of the same shape

    def describe(self) -> dict[str, Any]:
        return {"method": self.method.settings(), "family": self.family.name, "layers": list(self.layers),
                "seed": self.seed, "protected": self.family.protection_rule(self.protect_ids)}

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return (f"TokenPatch({self.method.name}, ratio={self.method.ratio:g}, layers={list(self.layers)}, "
                f"family={self.family.name}, {status})")


def default_layers(method: TokenMethod, depth: int) -> list[int]:
    """Where a method reduces by default: ToMe in every block; FastV once after block 2; the others
    at a quarter, half and three quarters of the depth (EViT's 4th/7th/10th of 12 blocks)."""
    if method.stages == "every":
        return list(range(depth))
    if method.stages == "single":
        return [min(2, depth - 1)]
    return sorted({depth // 4, depth // 2, (3 * depth) // 4})


def resolve_layers(method: TokenMethod, layers: Sequence[int] | None, depth: int) -> list[int]:
    if layers is None:
        return default_layers(method, depth)
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise PrunekitError("layers is empty; give at least one block index, or leave it out for the method's default")
    wrong = [layer for layer in chosen if not 0 <= layer < depth]
    if wrong:
        raise PrunekitError(f"layer {wrong[0]} does not exist: the model has {depth} blocks (0..{depth - 1})")
    if len(set(chosen)) != len(chosen):
        raise PrunekitError(f"layers {chosen} repeat a block")
    return sorted(chosen)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Every special token id of a Hugging Face tokenizer except the unknown token's."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return sorted(i for i in ids if i is not None)


def apply(model: nn.Module, method: "str | Mapping[str, Any] | TokenMethod" = "tome", ratio: float | None = None, *,
          layers: Sequence[int] | None = None, seed: int = 0, protect_ids: Sequence[int] = (), tokenizer: Any = None,
          **options: Any) -> TokenPatch:
    """Make ``model`` drop or merge tokens inside its forward pass; returns the handle that undoes it.

    ``ratio`` is the fraction of the reducible tokens (real, unprotected) that each reducing layer
    removes [default: the method's, 0.25]; ``rate``, its old name, is read for one more release with a
    warning. ``method`` is a name, ``{"name": ..., **settings}`` or a built method. ``layers`` lists the blocks that reduce (after their attention, before their MLP),
    by default the method's own schedule. ``protect_ids`` adds token ids that are never removed
    (for text models; [CLS]/first, [SEP]/last and padding are handled by rule); give ``tokenizer``
    to protect every special token it defines (a pair's middle [SEP], chat markers). Method settings
    (``r`` for ToMe, ``iterations`` for Zero-TPrune, ...) are keyword arguments.

    >>> with prunekit.tokens.apply(vit, "tome", ratio=0.2) as patch:
    ...     logits = vit(images)
    """
    from prunekit.tokens.families import find_family

    if not isinstance(model, nn.Module):
        raise PrunekitError(f"expected a torch model (nn.Module), got {type(model).__name__}")
    existing = TokenPatch.installed_on(model)
    if existing is not None:
        raise PrunekitError(f"the model already carries a token patch ({existing.method.name}); remove it first")
    family = find_family(model)
    if isinstance(method, TokenMethod) and (options or ratio is not None):
        raise PrunekitError("give settings either in the method object or as keyword arguments, not both")
    built = get_method(method, ratio, **options)
    family.check(built)
    chosen = resolve_layers(built, layers, family.depth)
    protected = sorted(set(int(i) for i in protect_ids) | set(special_token_ids(tokenizer) if tokenizer else ()))
    return TokenPatch(model, family, built, chosen, seed, protected).install()


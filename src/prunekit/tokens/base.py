"""The interface of a training-free token reduction method, and the selection rules they share.

A method sees the tokens of one layer (hidden states, the layer's attention, which tokens are
protected or padding) and decides which tokens survive, which merge into which, and which are
dropped. Everything else (where it runs, padding, positions, exact removal) is the patch's job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field, model_validator

from prunekit.core.config import warn_renamed
from prunekit.core.method import Method
from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

if TYPE_CHECKING:
    from prunekit.tokens.attention import AttentionView
    from prunekit.tokens.state import TokenState

METHODS: Registry[type["TokenMethod"]] = Registry("token method", ("prunekit.tokens.methods",))

Need = Literal["keys", "anchor_attention", "attention", "features"]
Stages = Literal["every", "quarters", "single"]


@dataclass
class ReductionStep:
    """Everything a method may look at when one layer reduces its tokens."""

    hidden: torch.Tensor  # (batch, tokens, width) after the layer's attention
    state: "TokenState"
    attention: "AttentionView"
    remove: torch.Tensor  # (batch,) how many reducible tokens this step removes from each sample
    layer: int
    generator: torch.Generator
    anchor: str = "first"  # the token whose attention row ranks the others: "first" ([CLS]) or "last"

    @property
    def reducible(self) -> torch.Tensor:
        """(batch, tokens) bool: real tokens that are not protected."""
        return self.state.reducible


@dataclass
class Selection:
    """A pruning decision: ``keep`` (batch, tokens) is True for every surviving token."""

    keep: torch.Tensor


FUSED = -2  # destination of tokens fused into one new token (EViT)
DROPPED = -1


@dataclass
class Assignment:
    """A merging decision: ``dest[b, i]`` is the index of the token that token i merges into (i itself
    for a survivor), ``FUSED`` for the extra fused token, or ``DROPPED``. Merged hidden states are
    averaged with the tokens' sizes as weights; the fused token uses ``fuse_weights`` instead."""

    dest: torch.Tensor
    fuse_weights: torch.Tensor | None = None


class TokenMethod(Method):
    """A way of choosing which tokens to drop or merge inside a transformer layer.

    Subclasses are pydantic models (``prunekit.core.method.Method``): ``ratio`` and their own fields
    are the settings, validated when the method is built by name through ``METHODS.build`` (from
    Python, the CLI, a recipe or a report). ``rate``, the name before ``ratio``, is read for one
    more release with a warning.
    """

    ratio: float = Field(0.25, ge=0.0, description="fraction of the reducible tokens each reducing layer removes")

    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the method reads: "keys" (attention keys), "anchor_attention" (the row of the [CLS] or last
    token), "attention" (every attention probability), "features" (hidden states)."""
    merges: ClassVar[bool] = False
    """Whether tokens are combined (so a token's position is no longer a single place)."""
    needs_cls: ClassVar[bool] = False
    max_ratio: ClassVar[float] = 1.0  # exclusive unless ``max_ratio_inclusive``
    max_ratio_inclusive: ClassVar[bool] = False
    stages: ClassVar[Stages] = "quarters"
    proportional_attention: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _read_rate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rate" in data:
            if "ratio" in data:
                raise ValueError("give 'ratio' or its old name 'rate', not both")
            warn_renamed("rate", "ratio")
            data = {("ratio" if key == "rate" else key): value for key, value in data.items()}
        return data

    @model_validator(mode="after")
    def _check_ratio(self) -> "TokenMethod":
        self.check_ratio()
        return self

    def check_ratio(self) -> None:
        ratio = self.ratio
        if ratio >= 1.0:
            raise PrunekitError(f"ratio {ratio:g} would remove every token at each reducing layer; "
                                f"give a ratio in [0, 1) (the fraction of the reducible tokens removed)")
        too_high = ratio > self.max_ratio if self.max_ratio_inclusive else ratio >= self.max_ratio
        if too_high:
            bound = f"<= {self.max_ratio:g}" if self.max_ratio_inclusive else f"< {self.max_ratio:g}"
            raise PrunekitError(f"{self.name} removes at most {self.max_ratio:.0%} of the tokens per layer; "
                                f"give a ratio {bound}, got {ratio:g}")

    def uses_proportional_attention(self) -> bool:
        return self.proportional_attention

    def removal_counts(self, reducible: torch.Tensor, layer: int) -> torch.Tensor:
        """How many tokens each sample loses at this layer, from its count of reducible tokens."""
        return torch.floor(reducible.to(torch.float64) * self.ratio + 1e-9).to(torch.long)

    def reduce(self, step: ReductionStep) -> Selection | Assignment:
        raise NotImplementedError

    def reduce_fast(self, step: ReductionStep) -> "tuple[torch.Tensor, TokenState] | None":
        """An optional shortcut for the common rectangular case (no padding, protected tokens first),
        returning the new hidden states and state directly; None falls back to ``reduce``."""
        return None


def get_method(spec: "str | Mapping[str, Any] | TokenMethod", ratio: float | None = None,
               **settings: Any) -> TokenMethod:
    """A token method from its name (or ``{"name": ..., **settings}``), through ``METHODS.build``:
    every setting, the ratio included, is checked here."""
    if ratio is not None:
        settings["ratio"] = ratio
    return METHODS.build(spec, **settings)


def with_removal(step: ReductionStep, remove: torch.Tensor) -> ReductionStep:
    return replace(step, remove=remove)


def keep_top(scores: torch.Tensor, step: ReductionStep) -> Selection:
    """Keep the highest-scoring reducible tokens (``step.remove`` fewer per sample), every protected
    token, and no padding. Ties break towards the earlier token, so a selection is reproducible."""
    state = step.state
    ranked = scores.float().masked_fill(state.protected, float("inf")).masked_fill(~state.valid, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    budget = state.valid.sum(dim=1) - step.remove
    return Selection(keep=(rank < budget[:, None]) & state.valid)


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(batch, n, n) cosine similarities of the rows of ``features`` (batch, n, d)."""
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)

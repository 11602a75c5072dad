"""The interface of a training-free token reduction method, and the selection rules they share.

A method sees the tokens of one layer (hidden states, the layer's attention, which tokens are
protected or padding) and decides which tokens survive, which merge into which, and which are
dropped. Everything else (where it runs, padding, positions, exact removal) is the patch's job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class TokenMethod(BaseModel):
    """A way of choosing which tokens to drop or merge inside a transformer layer.

    Subclasses are pydantic models: ``rate`` and their own fields are the settings, validated when
    the method is built by name (from Python, the CLI or a report).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(0.25, ge=0.0, description="fraction of the reducible tokens each reducing layer removes")

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the method reads: "keys" (attention keys), "anchor_attention" (the row of the [CLS] or last
    token), "attention" (every attention probability), "features" (hidden states)."""
    merges: ClassVar[bool] = False
    """Whether tokens are combined (so a token's position is no longer a single place)."""
    needs_cls: ClassVar[bool] = False
    max_rate: ClassVar[float] = 1.0  # exclusive unless ``max_rate_inclusive``
    max_rate_inclusive: ClassVar[bool] = False
    stages: ClassVar[Stages] = "quarters"
    proportional_attention: ClassVar[bool] = False

    def check_rate(self) -> None:
        rate = self.rate
        if rate >= 1.0:
            raise PrunekitError(f"rate {rate:g} would remove every token at each reducing layer; "
                                f"give a rate in [0, 1) (the fraction of the reducible tokens removed)")
        too_high = rate > self.max_rate if self.max_rate_inclusive else rate >= self.max_rate
        if too_high:
            bound = f"<= {self.max_rate:g}" if self.max_rate_inclusive else f"< {self.max_rate:g}"
            raise PrunekitError(f"{self.name} removes at most {self.max_rate:.0%} of the tokens per layer; "
                                f"give a rate {bound}, got {rate:g}")

    def uses_proportional_attention(self) -> bool:
        return self.proportional_attention

    def removal_counts(self, reducible: torch.Tensor, layer: int) -> torch.Tensor:
        """How many tokens each sample loses at this layer, from its count of reducible tokens."""
        return torch.floor(reducible.to(torch.float64) * self.rate + 1e-9).to(torch.long)

    def reduce(self, step: ReductionStep) -> Selection | Assignment:
        raise NotImplementedError

    def reduce_fast(self, step: ReductionStep) -> "tuple[torch.Tensor, TokenState] | None":
        """An optional shortcut for the common rectangular case (no padding, protected tokens first),
        returning the new hidden states and state directly; None falls back to ``reduce``."""
        return None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **self.model_dump(mode="json")}


def get_method(name: str, rate: float, **options: Any) -> TokenMethod:
    cls = METHODS.get(name)
    try:
        method = cls(rate=rate, **options)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "settings"
        if problem["type"] == "extra_forbidden":
            allowed = sorted(set(cls.model_fields) - {"rate"})
            raise PrunekitError(f"{cls.name} has no setting '{where}'; its settings are: "
                                f"{', '.join(allowed) if allowed else 'none besides rate'}") from None
        raise PrunekitError(f"{cls.name}: {where}: {problem['msg']}") from None
    method.check_rate()
    return method


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

"""The importance interface: score every unit of a family, reduce over its member tensors,
normalise across families so that one global ranking compares them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError
from prunekit.structure.graph import DependencyGraph, Family, Member

IMPORTANCE: Registry[type["Importance"]] = Registry("importance criterion", ("prunekit.structure.importance",))

Reduction = Literal["sum", "mean", "max"]
Normalization = Literal["mean", "max", "sum", "standardize", "kind", "cost", "none"]


@dataclass
class ScoringContext:
    """What criteria may read besides the weights: calibration statistics and gradients."""

    graph: DependencyGraph
    moments: Mapping[str, Any] = field(default_factory=dict)  # consumer weight -> ChannelMoments
    gradients: Mapping[str, torch.Tensor] = field(default_factory=dict)  # parameter -> summed gradient
    # family -> what the criterion gathered from one sample's gradients at a time (``Importance.per_sample``)
    per_sample: Mapping[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0


class SampleAccumulator(Protocol):
    """Gathers a criterion's statistic from one calibration sample's gradients at a time."""

    @property
    def tensors(self) -> list[str]:
        """The parameters whose gradients it reads."""

    def __call__(self, gradients: Mapping[str, torch.Tensor]) -> None:
        """Take one sample's gradients (parameter name -> gradient)."""

    def result(self) -> dict[str, torch.Tensor]:
        """Family name -> the statistic over every sample taken."""


def unit_slices(tensor: torch.Tensor, member: Member) -> torch.Tensor:
    """(units, per_unit, *rest): the slices of ``tensor`` belonging to each unit."""
    return tensor.detach().movedim(member.dim, 0)[member.index.to(tensor.device)].float()


def is_weight(context: ScoringContext, member: Member) -> bool:
    info = context.graph.tensors[member.tensor]
    return not info.is_buffer and len(info.shape) >= 2


def is_consumer(context: ScoringContext, member: Member) -> bool:
    """Columns of a Linear (rows of a Conv1D stored (in, out)) or input channels of a (non-grouped) convolution:
    where units are read.

    Dimension 1 of an embedding table is where hidden channels are *written*; activation statistics
    exist only for tensors a Linear or convolution multiplies its input by."""
    graph = context.graph
    return (member.tensor in graph.consumed_weights and member.dim == graph.input_dims.get(member.tensor, 1)
            and is_weight(context, member) and member.tensor not in graph.grouped_convs)


class Importance(BaseModel):
    """Scores units; higher means more important (kept first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    # What the pipeline provides before scoring: "moments" (activation statistics of the layers reading the
    # units), "gradients" (summed over the calibration data) and/or "sample_gradients" (one sample at a time,
    # fed to ``per_sample``).
    needs: ClassVar[frozenset[str]] = frozenset()
    default_normalize: ClassVar[Normalization] = "mean"  # for global ranking, unless the allocation names one

    reduction: Reduction = "sum"

    def member_scores(self, family: Family, member: Member, context: ScoringContext) -> torch.Tensor | None:
        """(units,) contribution of one member tensor, or None when the criterion ignores it."""
        raise NotImplementedError

    def score(self, family: Family, context: ScoringContext) -> torch.Tensor:
        parts = [s for member in family.members if (s := self.member_scores(family, member, context)) is not None]
        if not parts:
            tensors = ", ".join(sorted({m.tensor for m in family.members})[:4])
            if "moments" in self.needs:
                raise PrunekitError(f"importance '{self.name}' scores units by the inputs of the layers that read them, "
                                    f"and no Linear or convolution reads the units of {family.name} ({tensors}); "
                                    "use l2, l1, taylor or random, or --ignore this family")
            raise PrunekitError(f"importance '{self.name}' has nothing to score in {family.name} ({tensors})")
        stacked = torch.stack([p.double() for p in parts])
        if self.reduction == "sum":
            return stacked.sum(0)
        if self.reduction == "mean":
            return stacked.mean(0)
        return stacked.max(0).values

    def per_sample(self, families: Sequence[Family], context: ScoringContext) -> SampleAccumulator:
        """For criteria that need ``sample_gradients``: what gathers their statistic (into ``context.per_sample``)."""
        raise PrunekitError(f"importance '{self.name}' needs per-sample gradients but gathers nothing from them")

    def compensation(self) -> bool:
        """Whether removed input channels move their mean into the consumer's bias (FLAP)."""
        return bool(getattr(self, "compensate", False))

    def consumer_weights(self, family: Family, context: ScoringContext) -> list[str]:
        return [m.tensor for m in family.members if is_consumer(context, m)]

    def settings(self) -> dict:
        return {"name": self.name, **self.model_dump()}


def get_importance(spec: "str | Mapping[str, Any] | Importance") -> Importance:
    if isinstance(spec, Importance):
        return spec
    settings = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = settings.pop("name", None) or "flap"
    cls = IMPORTANCE.get(name)
    try:
        return cls(**settings)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise PrunekitError(f"importance {name}: {where}: {problem['msg']}") from None


def normalize_scores(scores: Mapping[str, torch.Tensor], families: Mapping[str, Family],
                     method: Normalization, unit_costs: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Make scores of different families comparable for one global ranking.

    ``mean``/``max``/``sum`` divide each family by that statistic of its own scores;
    ``standardize`` z-scores each family; ``kind`` z-scores all families of one kind together
    (heads against heads, neurons against neurons: FLAP's adaptive structure search); ``cost``
    divides each family by ``unit_costs`` (what one of its units costs in the allocation's target,
    parameters or MACs): for scores that estimate a loss, the loss per parameter or MAC removed, so
    that removing the lowest buys the target at the least estimated loss; ``none`` leaves raw scores.
    """
    result: dict[str, torch.Tensor] = {}
    if method == "cost":
        if unit_costs is None:
            raise PrunekitError("cost normalisation needs the cost of one unit of every family (the allocation gives it)")
        return {name: values.double() / max(float(unit_costs[name]), 1.0) for name, values in scores.items()}
    if method == "kind":
        by_kind: dict[str, list[str]] = {}
        for name in scores:
            by_kind.setdefault(families[name].kind, []).append(name)
        for names in by_kind.values():
            pooled = torch.cat([scores[n].double() for n in names])
            mean, std = pooled.mean(), pooled.std().clamp_min(1e-12) if pooled.numel() > 1 else torch.tensor(1.0)
            for n in names:
                result[n] = (scores[n].double() - mean) / std
        return result
    for name, values in scores.items():
        values = values.double()
        if method == "none":
            result[name] = values
        elif method == "standardize":
            std = values.std().clamp_min(1e-12) if values.numel() > 1 else torch.tensor(1.0, dtype=values.dtype)
            result[name] = (values - values.mean()) / std
        else:
            scale = {"mean": values.mean(), "max": values.max(), "sum": values.sum()}[method]
            result[name] = values / scale.clamp_min(1e-30)
    return result

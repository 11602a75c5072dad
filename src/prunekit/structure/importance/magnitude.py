"""L1 / L2 magnitude: the size of a unit's weights in every tensor it spans."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from prunekit.structure.importance.base import IMPORTANCE, Importance, is_weight, unit_slices


class _Magnitude(Importance):
    power: ClassVar[int]
    include_norms: bool = Field(False, description="also count 1-D parameters (norm weights, biases)")

    def member_scores(self, family, member, context):
        if not self.include_norms and not is_weight(context, member):
            return None
        if context.graph.tensors[member.tensor].is_buffer:
            return None
        slices = unit_slices(context.graph.tensor(member.tensor), member)
        return slices.abs().pow(self.power).flatten(1).sum(1)


@IMPORTANCE.register("l1")
class L1(_Magnitude):
    """Σ|w| over the unit's slices of every weight tensor."""

    name: ClassVar[str] = "l1"
    power: ClassVar[int] = 1


@IMPORTANCE.register("l2")
class L2(_Magnitude):
    """Σw² over the unit's slices of every weight tensor (the squared L2 norm of the group)."""

    name: ClassVar[str] = "l2"
    power: ClassVar[int] = 2

"""First-order Taylor: |w · ∂L/∂w| summed over the unit's weights, gradients summed over calibration data.

Removing a weight changes the loss by about -w·g; summing |w·g| over a unit's elements estimates
how much the loss depends on it (Molchanov et al., 2019; LLM-Pruner's element-wise variant).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from prunekit.errors import PrunekitError
from prunekit.structure.importance.base import IMPORTANCE, Importance, unit_slices


@IMPORTANCE.register("taylor")
class Taylor(Importance):
    name: ClassVar[str] = "taylor"
    needs: ClassVar[frozenset[str]] = frozenset({"gradients"})
    granularity: Literal["element", "unit"] = "element"  # Σ|w·g|, or |Σ w·g| over the unit

    def member_scores(self, family, member, context):
        info = context.graph.tensors[member.tensor]
        if info.is_buffer:
            return None
        gradient = context.gradients.get(member.tensor)
        if gradient is None:
            raise PrunekitError(f"taylor: no gradient for {member.tensor}; it did not take part in the loss")
        product = unit_slices(context.graph.tensor(member.tensor), member) * unit_slices(gradient, member)
        if self.granularity == "element":
            return product.abs().flatten(1).sum(1)
        return product.flatten(1).sum(1)

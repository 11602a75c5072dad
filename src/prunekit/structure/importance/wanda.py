"""Wanda, structured (Sun et al., 2024; "Wanda-sp" in An et al., 2024): a unit read by column j of
a consumer scores Σᵢ |W_ij| · ‖X_j‖₂, the weight magnitude scaled by how large its input is."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from prunekit.errors import PrunekitError
from prunekit.structure.importance.base import IMPORTANCE, Importance, is_consumer, unit_slices


@IMPORTANCE.register("wanda")
class WandaStructured(Importance):
    name: ClassVar[str] = "wanda"
    needs: ClassVar[frozenset[str]] = frozenset({"moments"})
    compensate: bool = Field(False, description="move removed inputs' mean into the consumer's bias")

    def member_scores(self, family, member, context):
        if not is_consumer(context, member):
            return None
        moments = context.moments.get(member.tensor)
        if moments is None:
            raise PrunekitError(f"wanda: no activation statistics for {member.tensor}")
        slices = unit_slices(context.graph.tensor(member.tensor), member)  # (units, per_unit, out, *kernel)
        norms = moments.norms()[member.index.reshape(-1)].reshape(member.index.shape)
        return (slices.abs().flatten(2).sum(2) * norms).sum(1)

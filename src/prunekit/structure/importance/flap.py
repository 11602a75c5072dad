"""FLAP (An et al., AAAI 2024): fluctuation-based structured pruning with bias compensation.

A channel j read by a consumer scores Var(X_j) · ‖W_:,j‖²: a channel whose input barely varies
across tokens carries little information, since its average can be folded into the consumer's
bias, which the compensation does when it is removed (b += W_:,j · E[X_j]). Heads sum their
channels. FLAP ranks heads and neurons of all layers together after standardising scores per
kind of structure (``normalize: kind`` in the allocation, its default for this criterion).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from prunekit.errors import PrunekitError
from prunekit.structure.importance.base import IMPORTANCE, Importance, is_consumer, unit_slices


@IMPORTANCE.register("flap")
class FLAP(Importance):
    name: ClassVar[str] = "flap"
    needs: ClassVar[frozenset[str]] = frozenset({"moments"})
    default_normalize: ClassVar[str] = "kind"
    compensate: bool = Field(True, description="move removed inputs' mean into the consumer's bias")

    def member_scores(self, family, member, context):
        if not is_consumer(context, member):
            return None
        moments = context.moments.get(member.tensor)
        if moments is None:
            raise PrunekitError(f"flap: no activation statistics for {member.tensor}")
        slices = unit_slices(context.graph.tensor(member.tensor), member)
        fluctuation = moments.variance()[member.index.reshape(-1)].reshape(member.index.shape)
        return (slices.square().flatten(2).sum(2) * fluctuation).sum(1)

"""Fisher: the loss a unit's removal costs, by the empirical Fisher information of its mask.

Put a mask ``m`` (1 = kept) on a unit's output; removing the unit sets ``m`` to 0. At a trained
model the loss's first derivative in ``m`` averages out over data, so the second-order term
decides: ΔL ≈ ½ F = ½ · mean over samples of (∂L_s/∂m)², the diagonal of the empirical Fisher
(Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022; Molchanov
et al. 2019's squared Taylor). A unit read by Linear or convolution columns has
∂L_s/∂m = Σ over those columns' elements of w · ∂L_s/∂w, so one gradient per calibration sample
(a language-model window, or one classifier example) gives it without a mask in the model. Units no
layer reads (written only) use all their weights' elements instead.

Unlike |w · g| summed over the data, this estimate is a loss in the same unit for every layer, so
families need no rescaling against each other; but a global allocation buys a number of parameters
or MACs, and a unit of one family can cost ten times one of another (a channel at 28×28 against one
at 7×7). Ranked as raw losses, the allocation takes the cheapest losses whatever they save and must
take many more of them: on four Fashion-MNIST CNNs at half the MACs it emptied the late layers
(docs/structure.md, "Structural criteria for classifiers"). So the ranking is the loss per
parameter or MAC removed (``normalize: cost``, its default): the greedy answer to buying the target
at the least estimated loss. Where every family's units cost the same (MLP neurons of a language
model) this is the raw ranking.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch

from prunekit.errors import PrunekitError
from prunekit.structure.graph import Family, Member
from prunekit.structure.importance.base import IMPORTANCE, Importance, ScoringContext, is_consumer, is_weight, unit_slices


@IMPORTANCE.register("fisher")
class Fisher(Importance):
    name: ClassVar[str] = "fisher"
    needs: ClassVar[frozenset[str]] = frozenset({"sample_gradients"})
    default_normalize: ClassVar[str] = "cost"

    @staticmethod
    def mask_members(family: Family, context: ScoringContext) -> list[Member]:
        """The members whose w · g sums to the gradient of the family's unit masks."""
        consumers = [m for m in family.members if is_consumer(context, m)]
        return consumers or [m for m in family.members if is_weight(context, m)]

    def per_sample(self, families: Sequence[Family], context: ScoringContext) -> "FisherAccumulator":
        return FisherAccumulator(list(families), context)

    def score(self, family: Family, context: ScoringContext) -> torch.Tensor:
        fisher = context.per_sample.get(family.name)
        if fisher is None:
            raise PrunekitError(f"fisher: no per-sample gradients were gathered for {family.name}")
        return fisher.double() / 2


class FisherAccumulator:
    """Σ over samples of (∂L_s/∂m)² for every family's units, fed one sample's gradients at a time."""

    def __init__(self, families: list[Family], context: ScoringContext):
        self.context = context
        self.members = {f.name: Fisher.mask_members(f, context) for f in families}
        empty = [f.name for f in families if not self.members[f.name]]
        if empty:
            raise PrunekitError(f"fisher has no weights to score in {', '.join(empty[:3])}")
        self.sums = {f.name: torch.zeros(f.size, dtype=torch.float64) for f in families}
        self.samples = 0

    @property
    def tensors(self) -> list[str]:
        return sorted({m.tensor for members in self.members.values() for m in members})

    def mask_gradients(self, gradients: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """∂L_s/∂m of every family's unit masks, from one sample's weight gradients."""
        graph = self.context.graph
        result = {}
        for name, members in self.members.items():
            mask_gradient = torch.zeros(self.sums[name].shape, dtype=torch.float64)
            for member in members:
                gradient = gradients.get(member.tensor)
                if gradient is None:
                    continue  # this sample's loss did not reach the tensor: its mask gradient is 0
                product = unit_slices(graph.tensor(member.tensor), member) * unit_slices(gradient, member)
                mask_gradient += product.flatten(1).sum(1).double()
            result[name] = mask_gradient
        return result

    def __call__(self, gradients: Mapping[str, torch.Tensor]) -> None:
        for name, mask_gradient in self.mask_gradients(gradients).items():
            self.sums[name] += mask_gradient.square()
        self.samples += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.samples == 0:
            raise PrunekitError("fisher needs at least one calibration sample")
        return {name: total / self.samples for name, total in self.sums.items()}

"""One-shot magnitude pruning, then training with the mask kept: the "prune a trained model and
fine-tune" baseline (Han et al., 2015). Prunes when built; global magnitude by default."""

from __future__ import annotations

from prunekit.training.base import Sparsifier
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod


@SPARSIFIERS.register("magnitude")
class OneShotMagnitudeMethod(SparseTrainingMethod):
    """No settings. It prunes the model it is given, so a pipeline trains that model first."""

    default_distribution = "global"
    needs = frozenset({"trained_model"})


class OneShotMagnitude(Sparsifier):
    method_class = OneShotMagnitudeMethod

    def start(self) -> None:
        scores = self.magnitude_scores()
        masks = self.masks_from_scores(scores, self.allocate(self.target_sparsity, scores), monotone_from=self.masks())
        self.apply_masks(masks, "prune")

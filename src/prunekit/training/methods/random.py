"""Random pruning at initialisation: a seeded random mask with the layer-wise ratios of the distribution.

Uniform ratios are the naive baseline; ER/ERK ratios make random sparse training competitive at
high sparsity (Liu et al., 2022, "The unreasonable effectiveness of random pruning").
"""

from __future__ import annotations

import torch

from prunekit.training.at_init import AtInitialization
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod


@SPARSIFIERS.register("random")
class RandomPruningMethod(SparseTrainingMethod):
    """No settings: the sparsifier's seed draws the mask, the distribution sets each layer's share."""


class RandomPruning(AtInitialization):
    method_class = RandomPruningMethod

    def compute_scores(self) -> dict[str, torch.Tensor]:
        return self.random_scores(self.generator(0))

"""Random pruning at initialisation: a seeded random mask with the layer-wise ratios of the distribution.

Uniform ratios are the naive baseline; ER/ERK ratios make random sparse training competitive at
high sparsity (Liu et al., 2022, "The unreasonable effectiveness of random pruning").
"""

from __future__ import annotations

import torch

from prunekit.training.at_init import AtInitialization
from prunekit.training.base import SPARSIFIERS


@SPARSIFIERS.register("random")
class RandomPruning(AtInitialization):
    name = "random"
    default_distribution = "uniform"

    def compute_scores(self) -> dict[str, torch.Tensor]:
        return self.random_scores(self.generator(0))

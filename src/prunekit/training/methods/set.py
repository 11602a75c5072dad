"""SET (Mocanu et al., 2018): sparse evolutionary training; drop by magnitude, grow at random.

The paper rewires once per epoch with a constant fraction ζ = 0.3 and ER ratios; prunekit's
defaults follow RigL's re-implementation (every ΔT steps, cosine-decayed fraction, ERK), and
``decay="constant"``, ``distribution="er"`` give the original. Growth draws are seeded by
(seed, step), so a resumed run grows the same connections.
"""

from __future__ import annotations

import torch

from prunekit.training.dynamic import DropAndGrowMethod, DynamicSparsifier
from prunekit.training.method import SPARSIFIERS


@SPARSIFIERS.register("set")
class SETMethod(DropAndGrowMethod):
    """SET's settings are those of every drop-and-grow method; it grows at random, so it needs no gradient."""


class SET(DynamicSparsifier):
    method_class = SETMethod

    def grow_scores(self) -> dict[str, torch.Tensor]:
        return self.random_scores(self.generator(1, self.steps))

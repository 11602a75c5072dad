"""RigL (Evci et al., 2020, "Rigging the lottery"): drop by magnitude, grow by gradient magnitude.

Every ΔT steps (default 100) until ``end_step`` (the paper: 75 % of training), each layer drops
the f_t share of its active weights with the smallest |w| and grows as many inactive connections
with the largest |∂L/∂w| of the current batch, f_t = α/2 · (1 + cos(π t / end_step)), α = 0.3.
The dense gradient is read from the masked weight's gradient in the backward pass right before an
update step only, so other steps cost nothing extra.
"""

from __future__ import annotations

import torch

from prunekit.training.dynamic import DropAndGrowMethod, DynamicSparsifier
from prunekit.training.method import SPARSIFIERS


@SPARSIFIERS.register("rigl")
class RigLMethod(DropAndGrowMethod):
    needs = frozenset({"schedule", "gradients"})


class RigL(DynamicSparsifier):
    method_class = RigLMethod

    def grow_scores(self) -> dict[str, torch.Tensor]:
        return {name: grad.abs() for name, grad in self.gradients().items()}

"""GraNd (Paul, Ganguli & Dziugaite 2021): the norm of each example's own loss gradient.

Computed over every trainable parameter with ``torch.func`` (one vmap'd gradient per example,
the model in eval mode so an example's gradient does not depend on its batch), early in
training (``epoch=0`` is the paper's "at initialisation"), averaged over seeds. Large = hard.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from prunekit.data.base import HIGHER, SCORES, Score


@SCORES.register("grand")
class GraNd(Score):
    summary = ("norm of the example's loss gradient over all parameters early in training, averaged over seeds "
               "(Paul et al. 2021)")
    harder = HIGHER
    needs = frozenset({"labels", "proxy_model"})

    epoch: int = Field(1, ge=0, description="read after this many proxy epochs (0: at initialisation)")

    def epochs_needed(self, proxy_epochs: int) -> int:
        return self.epoch

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            result["values"] = r.gradient_norms().double().numpy()

        run.at_epoch(self.epoch if run.config.train else 0, read)
        return lambda: result["values"]

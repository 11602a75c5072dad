"""EL2N (Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet").

The L2 norm of the error vector ``softmax(f(x)) - onehot(y)`` of a network a few epochs into
training, averaged over independently initialised runs (the paper's seeds). Large = hard.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from prunekit.data.base import HIGHER, SCORES, Score
from prunekit.errors import PrunekitError


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """||softmax(logits) - onehot(labels)||_2 of every row."""
    error = torch.softmax(logits.double(), dim=1)
    error[torch.arange(labels.shape[0]), labels] -= 1.0
    return error.norm(dim=1)


@SCORES.register("el2n")
class EL2N(Score):
    summary = "error L2 norm ||softmax - onehot|| early in training, averaged over seeds (Paul et al. 2021)"
    harder = HIGHER
    needs = frozenset({"labels", "proxy_model"})

    epoch: int = Field(1, ge=0, description="read after this many proxy epochs (0: at initialisation)")

    def epochs_needed(self, proxy_epochs: int) -> int:
        return self.epoch

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            logits, _ = r.outputs()
            if int(r.labels.max()) >= logits.shape[1]:
                raise PrunekitError(f"labels go up to {int(r.labels.max())} but the model has {logits.shape[1]} outputs")
            result["values"] = el2n(logits, r.labels).numpy()

        run.at_epoch(self.epoch if run.config.train else 0, read)
        return lambda: result["values"]

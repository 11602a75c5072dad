"""Loss of every example under the proxy model after its short training. High = hard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.data.base import HIGHER, SCORES, Score


@SCORES.register("loss")
@dataclass
class Loss(Score):
    name = "loss"
    summary = "the example's loss under the proxy after its training (cross-entropy unless a loss is given)"
    harder = HIGHER
    needs_labels = True

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            logits, _ = r.outputs()
            result["values"] = r.loss_fn(logits, r.labels).detach().double().numpy()

        run.at_end(read)
        return lambda: result["values"]

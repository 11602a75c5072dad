"""Loss of every example under the proxy model after its short training. High = hard."""

from __future__ import annotations

import numpy as np

from prunekit.data.base import HIGHER, SCORES, Score


@SCORES.register("loss")
class Loss(Score):
    summary = "the example's loss under the proxy after its training (cross-entropy unless a loss is given)"
    harder = HIGHER
    needs = frozenset({"labels", "proxy_model"})

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            logits, _ = r.outputs()
            result["values"] = r.loss_fn(logits, r.labels).detach().double().numpy()

        run.at_end(read)
        return lambda: result["values"]

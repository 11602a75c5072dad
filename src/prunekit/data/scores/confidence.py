"""Confidence: the proxy's largest class probability after training (Coleman et al. 2020, "Selection via Proxy").

It needs no label of the example itself (the proxy is trained on labels, or is a given trained
model), so it also ranks unlabelled data. Low confidence = uncertain = hard, so *lower is harder*.
"""

from __future__ import annotations

import numpy as np
import torch

from prunekit.data.base import LOWER, SCORES, Score


@SCORES.register("confidence")
class Confidence(Score):
    summary = "largest softmax probability of the proxy after training; low = uncertain (Coleman et al. 2020)"
    harder = LOWER
    needs = frozenset({"proxy_model"})

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            logits, _ = r.outputs()
            result["values"] = torch.softmax(logits.double(), dim=1).max(dim=1).values.numpy()

        run.at_end(read)
        return lambda: result["values"]

"""Entropy of the proxy's predicted class distribution after training (Coleman et al. 2020).

Label-free like confidence; high entropy = uncertain = hard.
"""

from __future__ import annotations

import numpy as np
import torch

from prunekit.data.base import HIGHER, SCORES, Score


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p of softmax(logits), in nats, per row (0 log 0 = 0)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


@SCORES.register("entropy")
class Entropy(Score):
    summary = "entropy (nats) of the proxy's class probabilities after training; high = uncertain (Coleman et al. 2020)"
    harder = HIGHER
    needs = frozenset({"proxy_model"})

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            logits, _ = r.outputs()
            result["values"] = entropy(logits).numpy()

        run.at_end(read)
        return lambda: result["values"]

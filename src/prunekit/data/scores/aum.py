"""Area under the margin (Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin Ranking").

At every presentation during training, the margin is the logit of the assigned class minus the
largest other logit; AUM is its mean over training. Low (negative) AUM marks hard or mislabelled
examples, so *lower is harder*.
"""

from __future__ import annotations

import torch

from prunekit.data.base import LOWER, SCORES, Score
from prunekit.errors import PrunekitError


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Assigned-class logit minus the largest other logit, per row."""
    logits = logits.double()
    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return assigned - others.max(dim=1).values


@SCORES.register("aum")
class AUM(Score):
    summary = "area under the margin: mean (assigned logit - largest other logit) over training (Pleiss et al. 2020)"
    harder = LOWER
    needs = frozenset({"labels", "proxy_training"})

    def attach(self, run):
        if run.stop_epoch < 1:
            raise PrunekitError("aum needs at least 1 proxy epoch (it averages margins over training)")
        total = torch.zeros(run.count, dtype=torch.float64)
        seen = torch.zeros(run.count, dtype=torch.int64)
        labels = run.labels

        def step(info) -> None:
            index = info.indices
            total[index] += margins(info.logits.cpu(), labels[index])
            seen[index] += 1

        run.on_step(step)
        return lambda: (total / seen.clamp(min=1)).numpy()

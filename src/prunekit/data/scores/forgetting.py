"""Forgetting events (Toneva et al. 2019, "An Empirical Study of Example Forgetting").

During training, an example is *forgotten* when it was classified correctly at one presentation
and wrongly at its next one (read from the minibatch's own logits, before the update). The score
is the number of such events; examples never classified correctly count as forgotten at every
presentation, above any example that was learnt (the paper ranks them as the most forgotten).
"""

from __future__ import annotations

import torch

from prunekit.data.base import HIGHER, SCORES, Score
from prunekit.errors import PrunekitError


@SCORES.register("forgetting")
class Forgetting(Score):
    summary = "forgetting events during proxy training; never-learnt examples rank highest (Toneva et al. 2019)"
    harder = HIGHER
    needs = frozenset({"labels", "proxy_training"})

    def attach(self, run):
        if run.stop_epoch < 2:
            raise PrunekitError("forgetting needs at least 2 proxy epochs (an example must be seen twice to be forgotten)")
        count = run.count
        previous = torch.zeros(count, dtype=torch.bool)
        learnt = torch.zeros(count, dtype=torch.bool)
        events = torch.zeros(count, dtype=torch.int64)
        presentations = torch.zeros(count, dtype=torch.int64)
        labels = run.labels

        def step(info) -> None:
            index = info.indices
            correct = info.logits.argmax(dim=1).cpu() == labels[index]
            events[index] += (previous[index] & ~correct).long()
            previous[index] = correct
            learnt[index] |= correct
            presentations[index] += 1

        run.on_step(step)

        def finish():
            values = events.double()
            values[~learnt] = presentations[~learnt].double()  # > floor(presentations / 2), the most events possible
            return values.numpy()

        return finish

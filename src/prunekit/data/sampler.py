"""Dynamic data pruning: a sampler that trains on a subset re-chosen every ``every`` epochs.

Static pruning scores once and trains on the subset; dynamic pruning (Raju et al. 2021, "Accelerating
Deep Learning with Dynamic Data Pruning"; InfoBatch, Qin et al. 2024) re-scores during training so
an example that becomes hard again comes back. Two ways to score:

* ``rescore(epoch) -> scores``: any function, e.g. EL2N of the current model on every example
  (:func:`model_scores`), called at every re-selection;
* observed values: feed the per-example losses the training loop already computes
  (``train_classifier(..., on_step=sampler.on_step)``); examples not seen since the start keep
  priority, so every example is seen before any is judged.

The sampler has a fixed length (the kept count), works with ``torch.utils.data.DataLoader`` and
with :func:`prunekit.training.loop.train_classifier` (``sampler=``), and is reproducible from its seed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from prunekit.data.base import HIGHER, LOWER
from prunekit.data.selection import kept_count, select
from prunekit.errors import PrunekitError


class DynamicPruningSampler(Sampler[int]):
    """Yields the indices of the current kept subset, shuffled per epoch; re-selects every ``every`` epochs."""

    def __init__(self, num_examples: int, ratio: float | None = None, count: int | None = None, every: int = 1,
                 strategy: str = "hardest", harder: str = HIGHER,
                 rescore: Callable[[int], np.ndarray] | None = None, labels: Sequence[int] | None = None,
                 balance: str = "none", seed: int = 0, keep: float | None = None, **strategy_settings: Any):
        """Trains on all but the fraction ``ratio`` of the examples (or on ``count`` of them); ``keep`` (the
        kept fraction, ``1 - ratio``) is deprecated."""
        if keep is not None:
            from prunekit.core.config import warn_renamed

            if ratio is not None:
                raise PrunekitError("give the removed fraction (ratio) or the deprecated kept fraction (keep), not both")
            warn_renamed("keep", "ratio (the fraction removed: 1 - keep)")
            ratio = 1.0 - keep
        if num_examples < 1:
            raise PrunekitError("a sampler needs at least one example")
        if every < 1:
            raise PrunekitError(f"re-selection interval must be at least 1 epoch, got {every}")
        if harder not in (HIGHER, LOWER):
            raise PrunekitError(f"harder must be higher or lower, got '{harder}'")
        self.num_examples = int(num_examples)
        self.count = kept_count(self.num_examples, ratio, count)
        self.every = every
        self.strategy = strategy
        self.strategy_settings = strategy_settings
        self.harder = harder
        self.rescore = rescore
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and self.labels.shape[0] != self.num_examples:
            raise PrunekitError(f"{self.labels.shape[0]} labels for {self.num_examples} examples")
        self.balance = balance
        self.seed = seed
        self.values = np.zeros(self.num_examples, dtype=np.float64)
        self.seen = np.zeros(self.num_examples, dtype=bool)
        self.epoch = 0
        self.current: np.ndarray | None = None
        self.history: dict[int, np.ndarray] = {}  # epoch -> the subset chosen then

    # scores -------------------------------------------------------------------------------
    def observe(self, indices: torch.Tensor | np.ndarray, values: torch.Tensor | np.ndarray) -> None:
        """Record the latest score of some examples (e.g. their training losses in this step)."""
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        value = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        self.values[index] = value
        self.seen[index] = True

    def on_step(self, info) -> None:
        """A ``train_classifier`` ``on_step`` callback: observe the batch's per-example losses."""
        self.observe(info.indices, info.loss)

    # sampler protocol -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.current is None or self.epoch % self.every == 0:
            self.current = self._choose()
            self.history[self.epoch] = self.current

    def _choose(self) -> np.ndarray:
        rng_seed = self.seed * 1_000_003 + self.epoch
        settings = dict(strategy=self.strategy, balance=self.balance, seed=rng_seed, **self.strategy_settings)
        if self.rescore is not None:
            scores = np.asarray(self.rescore(self.epoch), dtype=np.float64)
            if scores.shape != (self.num_examples,):
                raise PrunekitError(f"rescore returned shape {scores.shape}, expected ({self.num_examples},)")
            return select(scores, count=self.count, harder=self.harder, labels=self.labels, **settings).indices
        rng = np.random.default_rng(rng_seed)
        unseen = np.flatnonzero(~self.seen)
        if unseen.size >= self.count:
            return np.sort(rng.choice(unseen, size=self.count, replace=False))
        seen = np.flatnonzero(self.seen)
        labels = None if self.labels is None else self.labels[seen]
        rest = select(self.values[seen], count=self.count - unseen.size, harder=self.harder, labels=labels, **settings)
        return np.sort(np.concatenate([unseen, seen[rest.indices]]))

    def __iter__(self) -> Iterator[int]:
        if self.current is None:
            self.set_epoch(self.epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.current.shape[0], generator=generator).numpy()
        return iter(self.current[order].tolist())

    def __len__(self) -> int:
        return self.count


def model_scores(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, score: str = "el2n",
                 batch_size: int = 512) -> np.ndarray:
    """One score of every example on ``model`` as it is now (el2n, loss, confidence, entropy, grand:
    any score that reads a proxy model but not its training).

    For ``DynamicPruningSampler(rescore=lambda epoch: model_scores(model, x, y))``.
    """
    from prunekit.data.base import SCORES
    from prunekit.data.proxy import ProxyConfig, ProxyRun

    method = SCORES.build(score)
    if "proxy_model" not in method.needs or "proxy_training" in method.needs:
        readable = [name for name in SCORES.names()
                    if "proxy_model" in SCORES.get(name).needs and "proxy_training" not in SCORES.get(name).needs]
        raise PrunekitError(f"model_scores reads a score of the model as it is ({', '.join(readable)}), not '{score}'")
    # an untrained run reads the model at epoch 0 whatever epoch a score would read in proxy training
    config = ProxyConfig(model=model, train=False, eval_batch_size=batch_size)
    run = ProxyRun(config, inputs, labels, 0, seed=0, stop_epoch=0)
    finish = method.attach(run)
    was_training = model.training
    run.run()
    model.train(was_training)
    return finish()

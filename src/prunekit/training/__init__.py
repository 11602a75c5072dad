"""Training-time pruning and the plain training loops every dimension shares.

>>> sparsifier = prunekit.training.RigL(model, sparsity=0.9, distribution="erk", end_step=7500)
>>> for x, y in batches:
...     loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
...     sparsifier.step()

Methods (``SPARSIFIERS``, by name): gmp, channel_gmp, lottery, snip, grasp, synflow, random, set,
rigl, granet, magnitude (one-shot, then fine-tune), fixed (keep the current zeros).
``SPARSIFIERS.build({"rigl": {"end_step": 7500}})`` makes a method's settings from a recipe;
``.create(model, 0.9, "erk")`` puts it to work.
"""

from __future__ import annotations

from typing import Any

from prunekit.training.base import Sparsifier
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod, TrainingRun
from prunekit.training.methods.channel_gmp import ChannelGMP
from prunekit.training.methods.fixed import FixedMask
from prunekit.training.methods.gmp import GMP
from prunekit.training.methods.granet import GraNet
from prunekit.training.methods.grasp import GraSP
from prunekit.training.methods.lottery import LotteryTicket
from prunekit.training.methods.magnitude import OneShotMagnitude
from prunekit.training.methods.random import RandomPruning
from prunekit.training.methods.rigl import RigL
from prunekit.training.methods.set import SET
from prunekit.training.methods.snip import SNIP
from prunekit.training.methods.synflow import SynFlow

__all__ = ["GMP", "SET", "SNIP", "SPARSIFIERS", "ChannelGMP", "FixedMask", "GraNet", "GraSP", "LotteryTicket",
           "OneShotMagnitude", "RandomPruning", "RigL", "SparseTrainingMethod", "SparsityCallback", "Sparsifier",
           "SynFlow", "TrainingRun", "load_training_checkpoint", "save_training_checkpoint", "train_sparse"]

_LAZY = {
    # transformers is imported only by those who use its Trainer
    "SparsityCallback": ("prunekit.training.hf", "SparsityCallback"),
    "train_sparse": ("prunekit.training.fit", "train_sparse"),
    "save_training_checkpoint": ("prunekit.training.checkpoint", "save_training_checkpoint"),
    "load_training_checkpoint": ("prunekit.training.checkpoint", "load_training_checkpoint"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'prunekit.training' has no attribute {name!r}")

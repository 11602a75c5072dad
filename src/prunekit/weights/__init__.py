"""One-shot weight pruning: one file per method, registered by name in ``METHODS``."""

from prunekit.weights.base import METHODS, OneShotMethod, get_method
from prunekit.weights.pipeline import PruneResult, prune_weights

__all__ = ["METHODS", "OneShotMethod", "PruneResult", "get_method", "prune_weights"]

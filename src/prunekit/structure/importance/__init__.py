"""Importance criteria for structural units, one file each, registered in ``IMPORTANCE`` by name."""

from prunekit.structure.importance.base import IMPORTANCE, Importance, ScoringContext, get_importance, normalize_scores

__all__ = ["IMPORTANCE", "Importance", "ScoringContext", "get_importance", "normalize_scores"]

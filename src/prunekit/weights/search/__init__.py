"""Allocation by measurement and search for one-shot weight pruning (issue 18): the level database, the KL
fitness, and the run that hands both to a measured allocation (``knapsack``, ``evolutionary``)."""

from prunekit.weights.search.run import SearchResult, needs_search, search_levels, with_levels

__all__ = ["SearchResult", "needs_search", "search_levels", "with_levels"]

"""Data pruning: score every training example, keep a subset, write it, and measure what it costs.

>>> from prunekit import data
>>> table = data.score_data("fashion-mnist", ["el2n", "forgetting"])
>>> kept = data.select(table, "el2n", ratio=0.5, strategy="hardest")
>>> images, labels = data.open_data("fashion-mnist").subset(kept.indices)
"""

from prunekit.data.base import SCORES, STRATEGIES, Score, Strategy
from prunekit.data.proxy import ProxyConfig, ProxyRun
from prunekit.data.sampler import DynamicPruningSampler
from prunekit.data.scoring import ScoringContext, score_data
from prunekit.data.selection import Selection, class_quotas, kept_count, select
from prunekit.data.sources import DataSource, open_data
from prunekit.data.table import ScoreTable

__all__ = ["SCORES", "STRATEGIES", "DataSource", "DynamicPruningSampler", "ProxyConfig", "ProxyRun", "Score",
           "ScoreTable", "ScoringContext", "Selection", "Strategy", "class_quotas", "kept_count", "open_data",
           "score_data", "select"]

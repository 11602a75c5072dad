"""Fused query/key/value projections whose rows go head by head ([q, k, v] of head 0, then of head 1, ...).

GPT-NeoX (Pythia) and Persimmon reshape their fused projection to (heads, 3, head size);
nothing in the weights says so, hence this file.
"""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("per-head-qkv")
class PerHeadQKVAdapter(ModelAdapter):
    model_types = ("gpt_neox", "persimmon")
    qkv_layout = "per_head"

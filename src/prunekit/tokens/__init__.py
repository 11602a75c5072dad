"""Training-free token reduction inside transformers: ToMe, EViT, Zero-TPrune, DivPrune, FastV and
random / attention-magnitude baselines, on prunekit's ViT, Hugging Face encoders (text, ViT) and
Hugging Face causal language models at prefill, recognised by structure.

>>> import prunekit.tokens
>>> with prunekit.tokens.apply(model, "tome", ratio=0.2) as patch:
...     outputs = model(inputs)
"""

from prunekit.tokens.base import METHODS, TokenMethod, get_method
from prunekit.tokens.families import FAMILIES, find_family
from prunekit.tokens.patch import TokenPatch, apply
from prunekit.tokens.state import TokenState, pool_mean

__all__ = ["FAMILIES", "METHODS", "TokenMethod", "TokenPatch", "TokenState", "apply", "find_family", "get_method",
           "pool_mean"]

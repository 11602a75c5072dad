"""Key/value-cache compression of Hugging Face decoders: after the prompt (SnapKV, TOVA, Knorm, StreamingLLM,
Expected Attention, VATP, random), with a uniform or an adaptive (Ada-KV) budget over heads.

>>> import prunekit.kv
>>> with prunekit.kv.apply(model, "snapkv", ratio=0.5):
...     model.generate(input_ids, max_new_tokens=32)
"""

from prunekit.kv.base import METHODS, KVMethod, PrefillView, get_method
from prunekit.kv.budget import ALLOCATIONS, Selection, select
from prunekit.kv.patch import KVPatch, apply

__all__ = ["ALLOCATIONS", "KVMethod", "KVPatch", "METHODS", "PrefillView", "Selection", "apply", "get_method",
           "select"]

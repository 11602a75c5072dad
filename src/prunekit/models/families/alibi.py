"""Attention biased by ALiBi: each head's slope is computed from the number of heads.

Removing a head would change every remaining head's slope (and the model builds its ALiBi tensor for the
configured count), so no head can go exactly: heads stay whole. BLOOM also orders its fused
query_key_value head by head ([q, k, v] of each head), which nothing in the weights says.
"""

from prunekit.models.base import ADAPTERS, AttentionLayout, ModelAdapter

ALIBI = "ALiBi slopes are computed from the number of heads, so removing one would change the others"


@ADAPTERS.register("alibi")
class AlibiAdapter(ModelAdapter):
    model_types = ("bloom", "mpt")
    qkv_layout = "per_head"

    def head_blocker(self, attention: AttentionLayout) -> str | None:
        return ALIBI

"""Falcon: the row order of its fused query_key_value depends on the config, not on the weights, and so does
whether its heads are biased by ALiBi (whose slopes depend on the number of heads)."""

from prunekit.models.base import ADAPTERS, AttentionLayout, ModelAdapter
from prunekit.models.families.alibi import ALIBI


@ADAPTERS.register("falcon")
class FalconAdapter(ModelAdapter):
    model_types = ("falcon",)

    @property
    def qkv_layout(self):  # type: ignore[override]
        config = self.config
        if getattr(config, "new_decoder_architecture", False):
            return "per_group"
        return "stacked" if getattr(config, "multi_query", False) else "per_head"

    def head_blocker(self, attention: AttentionLayout) -> str | None:
        return ALIBI if getattr(self.config, "alibi", False) else super().head_blocker(attention)

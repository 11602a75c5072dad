"""Falcon: the row order of its fused query_key_value depends on the config, not on the weights."""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("falcon")
class FalconAdapter(ModelAdapter):
    model_types = ("falcon",)

    @property
    def qkv_layout(self):  # type: ignore[override]
        config = self.config
        if getattr(config, "new_decoder_architecture", False):
            return "per_group"
        return "stacked" if getattr(config, "multi_query", False) else "per_head"

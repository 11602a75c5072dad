"""Phi-3: the attention splits its fused qkv_proj at ``config.num_attention_heads × head_dim``.

The forward reads the query width from the model's config, shared by every layer, not from the layer, so
one layer's heads cannot be removed without mis-splitting the others: heads stay whole.
"""

from prunekit.models.base import ADAPTERS, AttentionLayout, ModelAdapter


@ADAPTERS.register("phi3")
class Phi3Adapter(ModelAdapter):
    model_types = ("phi3", "phi4_multimodal")

    def head_blocker(self, attention: AttentionLayout) -> str | None:
        return ("its forward splits the fused qkv_proj at the query width of the shared config, so no layer can "
                "lose heads on its own")

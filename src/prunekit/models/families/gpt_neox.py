"""GPT-NeoX / Pythia decoders: fused query_key_value projection, parallel attention and MLP."""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("gpt_neox")
class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    blocks_path = "gpt_neox.layers"
    embeddings_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    head_path = "embed_out"

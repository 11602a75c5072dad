"""OPT decoders: post-projection layer norms, fc1/fc2 MLP, learned positions."""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("opt")
class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    embeddings_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"
    head_path = "lm_head"

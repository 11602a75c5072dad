"""Llama-style decoders: pre-norm blocks with separate q/k/v/o projections and a gated MLP."""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("llama")
class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "smollm3")
    blocks_path = "model.layers"
    embeddings_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    head_path = "lm_head"

"""Llama-style decoders: pre-norm blocks with separate q/k/v/o projections and a gated MLP."""

from torch import nn

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("llama")
class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "smollm3")
    blocks_path = "model.layers"
    embeddings_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    head_path = "lm_head"

    attention_path = "self_attn"
    attention_projections = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}

    def head_counts(self, heads_module: nn.Module, q: nn.Module, k: nn.Module) -> tuple[int, int, int]:
        head_dim = int(heads_module.head_dim)
        return q.out_features // head_dim, k.out_features // head_dim, head_dim

    def set_head_counts(self, heads_module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        # The forward reshapes with -1 heads; only the query/key-value ratio is read (repeat_kv, GQA sdpa).
        heads_module.num_key_value_groups = num_heads // num_kv_heads
        for attribute, value in (("num_heads", num_heads), ("num_attention_heads", num_heads),
                                 ("num_key_value_heads", num_kv_heads)):
            if hasattr(heads_module, attribute):
                setattr(heads_module, attribute, value)

    def bias_siblings(self, module_name: str) -> list[str]:
        # One config flag (attention_bias, mlp_bias) switches the bias of every projection of every block.
        groups = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
        for part, names in groups.items():
            if f".{part}." in f".{module_name}":
                return [f"{self.block_name(i)}.{part}.{n}" for i in range(len(self.blocks())) for n in names]
        return [module_name]

    def structure_config(self) -> tuple[dict, list[str]]:
        config = self.model.config
        blocks = self.blocks()
        updates: dict = {"num_hidden_layers": len(blocks)}
        blockers: list[str] = []
        mlp_widths = {block.mlp.down_proj.in_features for block in blocks}
        if len(mlp_widths) == 1:
            updates["intermediate_size"] = mlp_widths.pop()
        elif mlp_widths:
            blockers.append(f"MLP widths differ across layers ({min(mlp_widths)}..{max(mlp_widths)})")
        heads = set()
        for layout in self.attention_layouts():
            heads.add((layout.num_heads, layout.num_kv_heads, layout.head_dim))
        if len(heads) == 1:
            num_heads, num_kv_heads, head_dim = heads.pop()
            updates.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim)
        elif heads:
            blockers.append("head counts differ across layers")
        embeddings = self.embeddings()
        if embeddings is not None:
            updates["hidden_size"] = embeddings.embedding_dim
        for flag, part, names in (("attention_bias", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  ("mlp_bias", "mlp", ("gate_proj", "up_proj", "down_proj"))):
            if not hasattr(config, flag):
                continue
            has_bias = [getattr(getattr(block, part), name).bias is not None for block in blocks for name in names]
            if all(has_bias):
                updates[flag] = True
            elif any(has_bias):
                blockers.append(f"only some {part} projections have a bias, which {flag} cannot describe")
        return updates, blockers

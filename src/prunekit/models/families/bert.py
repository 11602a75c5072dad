"""BERT encoders (all-MiniLM-L6-v2 and friends): post-norm blocks, query/key/value + output dense, GELU MLP."""

from torch import nn

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("bert")
class BertAdapter(ModelAdapter):
    model_types = ("bert",)
    blocks_path = "encoder.layer"
    embeddings_path = "embeddings.word_embeddings"
    final_norm_path = None
    head_path = None

    attention_path = "attention"
    attention_heads_path = "self"
    attention_projections = {"q": "self.query", "k": "self.key", "v": "self.value", "o": "output.dense"}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # BertModel keeps its encoder at the root; task models (BertForMaskedLM, ...) under "bert".
        prefix = "" if hasattr(model, "encoder") else "bert."
        self.blocks_path = f"{prefix}encoder.layer"
        self.embeddings_path = f"{prefix}embeddings.word_embeddings"
        self.head_path = "cls.predictions.decoder" if hasattr(model, "cls") else None

    def head_counts(self, heads_module: nn.Module, q: nn.Module, k: nn.Module) -> tuple[int, int, int]:
        head_dim = int(heads_module.attention_head_size)
        return q.out_features // head_dim, k.out_features // head_dim, head_dim

    def set_head_counts(self, heads_module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        heads_module.num_attention_heads = num_heads
        heads_module.all_head_size = num_heads * heads_module.attention_head_size

    def structure_config(self) -> tuple[dict, list[str]]:
        config = self.model.config
        blocks = self.blocks()
        updates: dict = {"num_hidden_layers": len(blocks)}
        blockers: list[str] = []
        widths = {block.intermediate.dense.out_features for block in blocks}
        if len(widths) == 1:
            updates["intermediate_size"] = widths.pop()
        else:
            blockers.append(f"MLP widths differ across layers ({min(widths)}..{max(widths)})")
        if any(layout.num_heads != config.num_attention_heads for layout in self.attention_layouts()):
            blockers.append("BERT configs derive the head size from hidden_size / num_attention_heads, "
                            "so they cannot describe removed heads")
        embeddings = self.embeddings()
        if embeddings is not None and embeddings.embedding_dim != config.hidden_size:
            blockers.append("the hidden width changed, which a BERT config ties to the head size")
        return updates, blockers

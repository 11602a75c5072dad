"""BERT-style encoders: the config derives the head size from hidden_size / num_attention_heads.

So no config can describe an encoder whose heads were removed (or whose hidden width changed);
``prunekit.load`` rebuilds such a model from its shape spec instead.
"""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("bert")
class BertAdapter(ModelAdapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "deberta-v2",
                   "deberta", "mpnet", "roformer", "ernie", "data2vec-text", "megatron-bert")

    def structure_config(self) -> tuple[dict, list[str]]:
        updates, blockers = super().structure_config()
        config = self.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
        if any(layout.num_heads != heads for layout in self.attention_layouts()):
            blockers.append("BERT-style configs derive the head size from the hidden size and the number of heads, "
                            "so they cannot describe removed heads")
            for key in ("num_attention_heads", "n_heads"):
                updates.pop(key, None)
        embeddings = self.embeddings()
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        if embeddings is not None and embeddings.embedding_dim != hidden:
            blockers.append("the hidden width changed, which a BERT-style config ties to the head size")
        return updates, blockers

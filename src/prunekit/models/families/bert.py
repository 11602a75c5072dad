"""BERT-style encoders: the config derives the head size from hidden_size / num_attention_heads.

So no config can describe an encoder whose heads were removed (or whose hidden width changed);
``prunekit.load`` rebuilds such a model from its shape spec instead.
"""

from prunekit.models.base import ADAPTERS, ModelAdapter
from prunekit.models.layout import CONFIG_EMBEDDING, CONFIG_HIDDEN, config_value


@ADAPTERS.register("bert")
class BertAdapter(ModelAdapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta-v2",
                   "deberta", "mpnet", "roformer", "ernie", "data2vec-text", "megatron-bert")

    def structure_config(self) -> tuple[dict, list[str]]:
        updates, blockers = super().structure_config()
        config = self.config
        embeddings = self.embeddings()
        hidden, _ = config_value(config, CONFIG_EMBEDDING + CONFIG_HIDDEN)
        if embeddings is not None and embeddings.embedding_dim != hidden:
            blockers.append("the hidden width changed, which a BERT-style config ties to the head size")
        return updates, blockers

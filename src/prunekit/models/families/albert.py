"""ALBERT: one group of layers (``encoder.albert_layer_groups``) applied ``num_hidden_layers`` times.

The blocks prunekit finds are the shared groups, so their count is ``num_hidden_groups``, not the number of
layers the config's ``num_hidden_layers`` runs; nothing in the modules says how often a group is applied.
"""

from prunekit.models.base import ADAPTERS
from prunekit.models.families.bert import BertAdapter


@ADAPTERS.register("albert")
class AlbertAdapter(BertAdapter):
    model_types = ("albert",)

    def structure_config(self) -> tuple[dict, list[str]]:
        updates, blockers = super().structure_config()
        config = self.config
        updates.pop("num_hidden_layers", None)
        if len(self.blocks()) != getattr(config, "num_hidden_groups", len(self.blocks())):
            blockers.append("ALBERT's config cannot describe removed layer groups")
        return updates, blockers

"""Model families (adapters that say where the blocks and layers are) and offline model assets."""

from prunekit.models.base import ADAPTERS, ModelAdapter, adapter_for

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]

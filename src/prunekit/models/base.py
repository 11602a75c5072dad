"""Adapters: where a model family keeps its blocks, embeddings, final norm and head.

Algorithms ask the adapter instead of testing model types, so a new architecture is a new
adapter file in this package, never an ``if`` inside a pruning method.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model family", ("prunekit.models.families",))


class ModelAdapter:
    """Describes one family of Hugging Face transformer models.

    Subclasses set ``model_types`` (``config.model_type`` values) and the dotted paths of the
    pieces; they override methods only where a path is not enough.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    blocks_path: ClassVar[str] = ""
    embeddings_path: ClassVar[str] = ""
    final_norm_path: ClassVar[str | None] = None
    head_path: ClassVar[str | None] = "lm_head"

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    def _get(self, path: str | None) -> nn.Module | None:
        if not path:
            return None
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    @property
    def blocks_prefix(self) -> str:
        return self.blocks_path

    def blocks(self) -> nn.ModuleList:
        blocks = self._get(self.blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise PrunekitError(f"{type(self.model).__name__} has no decoder blocks at '{self.blocks_path}'")
        return blocks

    def block_name(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}"

    def embeddings(self) -> nn.Module | None:
        return self._get(self.embeddings_path)

    def final_norm(self) -> nn.Module | None:
        return self._get(self.final_norm_path)

    def head(self) -> nn.Module | None:
        return self._get(self.head_path)

    def heads_are_tied(self) -> bool:
        head, embeddings = self.head(), self.embeddings()
        return head is not None and embeddings is not None and head.weight is embeddings.weight

    def describe(self) -> dict:
        return {"family": type(self).__name__, "model_type": getattr(self.model.config, "model_type", None),
                "blocks": len(self.blocks())}


def adapter_for(model: nn.Module) -> ModelAdapter:
    for name in ADAPTERS.names():
        adapter_cls = ADAPTERS.get(name)
        if adapter_cls.matches(model):
            return adapter_cls(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = sorted({t for n in ADAPTERS.names() for t in ADAPTERS.get(n).model_types})
    raise PrunekitError(f"unsupported model family '{model_type}'; supported: {', '.join(supported)}")

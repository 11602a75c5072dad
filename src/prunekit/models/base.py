"""Adapters: where a model family keeps its blocks, embeddings, final norm and head.

Algorithms ask the adapter instead of testing model types, so a new architecture is a new
adapter file in this package, never an ``if`` inside a pruning method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model family", ("prunekit.models.families",))


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention's projections are and how many heads it has (for structural pruning).

    ``q``/``k``/``v``/``o`` are module paths from the model root; ``heads_module`` holds the size
    attributes its forward reads (number of heads, key/value groups).
    """

    name: str
    heads_module: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


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

    # ---- structural pruning (optional: families that leave these unset keep their heads) ----
    attention_path: ClassVar[str | None] = None  # inside a block
    attention_heads_path: ClassVar[str] = ""  # module holding the head attributes, inside the attention
    attention_projections: ClassVar[dict[str, str]] = {}  # q/k/v/o, inside the attention

    def attention_layouts(self) -> list[AttentionLayout]:
        """Every block's attention with its head counts, for head-level structural pruning."""
        if not self.attention_path or not self.attention_projections:
            return []
        layouts = []
        for index in range(len(self.blocks())):
            base = f"{self.block_name(index)}.{self.attention_path}"
            if self._get(base) is None:
                continue  # a block without attention (hybrid architectures)
            heads_name = f"{base}.{self.attention_heads_path}" if self.attention_heads_path else base
            paths = {role: f"{base}.{path}" for role, path in self.attention_projections.items()}
            heads, kv_heads, head_dim = self.head_counts(self.model.get_submodule(heads_name),
                                                         self.model.get_submodule(paths["q"]),
                                                         self.model.get_submodule(paths["k"]))
            layouts.append(AttentionLayout(base, heads_name, paths["q"], paths["k"], paths["v"], paths["o"],
                                           heads, kv_heads, head_dim))
        return layouts

    def head_counts(self, heads_module: nn.Module, q: nn.Module, k: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of one attention."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its attention heads")

    def set_head_counts(self, heads_module: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attributes an attention's forward reads after heads were removed."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its number of heads")

    def bias_siblings(self, module_name: str) -> list[str]:
        """Modules that must gain a (zero) bias together with ``module_name`` so one config flag describes them."""
        return [module_name]

    def structure_config(self) -> tuple[dict, list[str]]:
        """Config updates describing the model's current widths, and the reasons (if any) why a plain
        ``from_pretrained`` cannot rebuild it from its config (for example widths that differ by layer)."""
        return {"num_hidden_layers": len(self.blocks())}, []

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

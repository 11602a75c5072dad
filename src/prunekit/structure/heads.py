"""Attention heads as prunable units.

The channel trace sees attention as projections whose outputs are reshaped into heads; it marks
those channels as split (their sizes are fixed by a reshape) and leaves them alone. Removing a
head needs to know which rows and columns make it and which attributes the forward reads, so a
head layout comes from the model family's adapter (Hugging Face models) or from a rule for a
module class (``HEAD_RULES``, for models defined in plain PyTorch such as prunekit's ViT).

Grouped-query attention has two exact ways to remove heads (``mode``):

- ``kv``: remove whole key/value groups, each with every query head that reads it;
- ``query``: remove query heads only, the same number from every group, keeping all key/value heads.

With one query head per key/value head (plain multi-head attention) both are the same: a head's
query, key and value rows and its output columns go together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter

HeadMode = Literal["kv", "query"]


@dataclass
class Projection:
    """Rows ``offset .. offset + heads × head_dim`` of ``weight`` (and ``bias``) produce heads."""

    weight: str
    bias: str | None
    offset: int = 0


@dataclass
class HeadLayout:
    name: str
    q: Projection
    k: Projection
    v: Projection
    o_weight: str  # columns of the output projection read the heads
    num_heads: int
    num_kv_heads: int
    head_dim: int
    set_heads: Callable[[int, int], None]
    modules: tuple[str, ...]

    def tensors(self) -> set[str]:
        names = {self.o_weight}
        for projection in (self.q, self.k, self.v):
            names.add(projection.weight)
            if projection.bias:
                names.add(projection.bias)
        return names

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def _rows(self, heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads])

    def units(self, mode: HeadMode) -> list[dict[tuple[str, int], torch.Tensor]]:
        """Each unit as ``{(tensor, dim): indices}``; ``mode`` as in the module docstring."""
        result = []
        if mode == "kv" or self.heads_per_group == 1:
            for group in range(self.num_kv_heads):
                query_heads = list(range(group * self.heads_per_group, (group + 1) * self.heads_per_group))
                unit: dict[tuple[str, int], list[torch.Tensor]] = {}
                q_rows = self._rows(query_heads)
                kv_rows = self._rows([group])
                for projection, rows in ((self.q, q_rows), (self.k, kv_rows), (self.v, kv_rows)):
                    _add(unit, (projection.weight, 0), rows + projection.offset)
                    if projection.bias:
                        _add(unit, (projection.bias, 0), rows + projection.offset)
                _add(unit, (self.o_weight, 1), q_rows)
                result.append({key: torch.cat(parts) for key, parts in unit.items()})
        else:
            for head in range(self.num_heads):
                unit = {}
                rows = self._rows([head])
                _add(unit, (self.q.weight, 0), rows + self.q.offset)
                if self.q.bias:
                    _add(unit, (self.q.bias, 0), rows + self.q.offset)
                _add(unit, (self.o_weight, 1), rows)
                result.append({key: torch.cat(parts) for key, parts in unit.items()})
        return result

    def unit_name(self, mode: HeadMode) -> str:
        if self.heads_per_group == 1:
            return "head"
        return "KV group" if mode == "kv" else "query head"

    def groups(self, mode: HeadMode) -> int:
        """Units come in this many equal groups that must keep equal counts (GQA query mode)."""
        return self.num_kv_heads if (mode == "query" and self.heads_per_group > 1) else 1

    def apply(self, mode: HeadMode, kept_units: int) -> None:
        if mode == "kv" or self.heads_per_group == 1:
            kv = kept_units
            self.set_heads(kv * self.heads_per_group, kv)
        else:
            self.set_heads(kept_units, self.num_kv_heads)


def _add(unit: dict, key: tuple[str, int], rows: torch.Tensor) -> None:
    unit.setdefault(key, []).append(rows)


class HeadRule:
    """Describes the heads of one attention module class defined outside Hugging Face."""

    name: ClassVar[str]

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def layout(cls, name: str, module: nn.Module, tensor_name: Callable[[torch.Tensor], str]) -> HeadLayout:
        raise NotImplementedError


HEAD_RULES: Registry[type[HeadRule]] = Registry("attention head rule", ())


@HEAD_RULES.register("prunekit-vit")
class PrunekitViTHeads(HeadRule):
    """``prunekit.models.vit.Attention``: one fused qkv Linear (q, k, v stacked by rows) and ``proj``."""

    name = "prunekit-vit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from prunekit.models.vit import Attention

        return isinstance(module, Attention)

    @classmethod
    def layout(cls, name, module, tensor_name):
        width = module.num_heads * module.head_dim
        bias = tensor_name(module.qkv.bias) if module.qkv.bias is not None else None
        weight = tensor_name(module.qkv.weight)

        def set_heads(num_heads: int, _kv: int) -> None:
            module.num_heads = num_heads

        return HeadLayout(name, Projection(weight, bias, 0), Projection(weight, bias, width),
                          Projection(weight, bias, 2 * width), tensor_name(module.proj.weight), module.num_heads,
                          module.num_heads, module.head_dim, set_heads, (name, f"{name}.qkv", f"{name}.proj"))


def find_head_layouts(model: nn.Module, adapter: ModelAdapter | None,
                      tensor_name: Callable[[torch.Tensor], str]) -> list[HeadLayout]:
    """Head layouts from the adapter (Hugging Face families) and from ``HEAD_RULES`` (other modules)."""
    layouts: list[HeadLayout] = []
    claimed: set[str] = set()
    if adapter is not None:
        for attention in adapter.attention_layouts():
            modules = {role: model.get_submodule(path) for role, path in
                       (("q", attention.q), ("k", attention.k), ("v", attention.v), ("o", attention.o))}
            heads_module = model.get_submodule(attention.heads_module)

            def projection(role: str) -> Projection:
                module = modules[role]
                return Projection(tensor_name(module.weight),
                                  tensor_name(module.bias) if module.bias is not None else None)

            def set_heads(num_heads: int, num_kv_heads: int, heads_module=heads_module) -> None:
                adapter.set_head_counts(heads_module, num_heads, num_kv_heads)

            if attention.num_heads % max(attention.num_kv_heads, 1):
                raise PrunekitError(f"{attention.name}: {attention.num_heads} query heads do not divide into "
                                    f"{attention.num_kv_heads} key/value groups")
            layouts.append(HeadLayout(attention.name, projection("q"), projection("k"), projection("v"),
                                      tensor_name(modules["o"].weight), attention.num_heads, attention.num_kv_heads,
                                      attention.head_dim, set_heads,
                                      (attention.name, attention.q, attention.k, attention.v, attention.o)))
            claimed.add(attention.name)
    rules = [HEAD_RULES.get(name) for name in HEAD_RULES.names()]
    for name, module in model.named_modules():
        if name in claimed:
            continue
        for rule in rules:
            if rule.matches(module):
                layouts.append(rule.layout(name, module, tensor_name))
                break
    return layouts

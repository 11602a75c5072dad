"""Attention heads as prunable units.

The channel trace sees attention as projections whose outputs are reshaped into heads; it marks
those channels as split (their sizes are fixed by a reshape) and leaves them alone. Removing a
head needs to know which rows and columns make it and which attributes the forward reads, so a
head layout comes from the model's adapter (``prunekit.models.base.ModelAdapter.attention_layouts``),
the same one for Hugging Face families and for plain PyTorch models such as prunekit's ViT.

A fused query/key/value projection orders its rows as the adapter says (``qkv_layout``): ``stacked``
(all queries, then keys, then values), ``per_head`` ([q, k, v] of each head in turn), ``per_group``
(each key/value group's queries, then its key, then its value); an ``opaque`` order, or an attention
the adapter names a reason for (``head_blocker``), keeps its heads whole and the notes say why.
Transposed weights (transformers' ``Conv1D``, stored (in, out)) hold their rows in dimension 1.

Grouped-query attention has two exact ways to remove heads (``mode``):

- ``kv``: remove whole key/value groups, each with every query head that reads it;
- ``query``: remove query heads only, the same number from every group, keeping all key/value heads.

With one query head per key/value head (plain multi-head attention) both are the same: a head's
query, key and value rows and its output columns go together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.base import AttentionLayout, ModelAdapter, QKVLayout, adapter_for

HeadMode = Literal["kv", "query"]


@dataclass
class Projection:
    """A weight (and bias) whose rows produce heads; ``dim`` holds the rows (1 for a weight stored (in, out))."""

    weight: str
    bias: str | None
    dim: int = 0


@dataclass
class HeadLayout:
    name: str
    q: Projection
    k: Projection
    v: Projection
    o_weight: str  # the output projection's input columns read the heads
    num_heads: int
    num_kv_heads: int
    head_dim: int
    set_heads: Callable[[int, int], None]
    modules: tuple[str, ...]
    qkv_layout: QKVLayout = "stacked"
    fused: bool = False
    o_dim: int = 1  # the output projection's dimension holding its input columns
    per_head: tuple[str, ...] = ()  # parameters holding one value per query head (attention sinks)

    def tensors(self) -> set[str]:
        names = {self.o_weight, *self.per_head}
        for projection in (self.q, self.k, self.v):
            names.add(projection.weight)
            if projection.bias:
                names.add(projection.bias)
        return names

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def _span(self, start_head: int) -> torch.Tensor:
        return torch.arange(start_head * self.head_dim, (start_head + 1) * self.head_dim)

    def rows(self, role: str, index: int) -> torch.Tensor:
        """Rows of query head ``index`` (role ``q``) or of key/value group ``index`` (``k``, ``v``) in their
        projection, as the layout orders a fused projection (see the module docstring)."""
        heads, groups, per_group = self.num_heads, self.num_kv_heads, self.heads_per_group
        if not self.fused:
            return self._span(index)
        if self.qkv_layout == "stacked":
            start = {"q": index, "k": heads + index, "v": heads + groups + index}[role]
        elif self.qkv_layout == "per_head":
            start = 3 * index + {"q": 0, "k": 1, "v": 2}[role]
        elif self.qkv_layout == "per_group":
            group = index // per_group if role == "q" else index
            offset = index % per_group if role == "q" else per_group + (role == "v")
            start = group * (per_group + 2) + offset
        else:
            raise PrunekitError(f"{self.name}: the order of its fused query/key/value rows is not one prunekit knows")
        return self._span(start)

    def units(self, mode: HeadMode) -> list[dict[tuple[str, int], torch.Tensor]]:
        """Each unit as ``{(tensor, dim): indices}``; ``mode`` as in the module docstring."""
        result = []
        if mode == "kv" or self.heads_per_group == 1:
            for group in range(self.num_kv_heads):
                query_heads = range(group * self.heads_per_group, (group + 1) * self.heads_per_group)
                unit: dict[tuple[str, int], list[torch.Tensor]] = {}
                for head in query_heads:
                    self._add_rows(unit, self.q, self.rows("q", head))
                for role, projection in (("k", self.k), ("v", self.v)):
                    self._add_rows(unit, projection, self.rows(role, group))
                _add(unit, (self.o_weight, self.o_dim), torch.cat([self._span(h) for h in query_heads]))
                for tensor in self.per_head:
                    _add(unit, (tensor, 0), torch.as_tensor(list(query_heads)))
                result.append({key: torch.cat(parts) for key, parts in unit.items()})
        else:
            for head in range(self.num_heads):
                unit = {}
                self._add_rows(unit, self.q, self.rows("q", head))
                _add(unit, (self.o_weight, self.o_dim), self._span(head))
                for tensor in self.per_head:
                    _add(unit, (tensor, 0), torch.tensor([head]))
                result.append({key: torch.cat(parts) for key, parts in unit.items()})
        return result

    @staticmethod
    def _add_rows(unit: dict, projection: Projection, rows: torch.Tensor) -> None:
        _add(unit, (projection.weight, projection.dim), rows)
        if projection.bias:
            _add(unit, (projection.bias, 0), rows)

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


def structural_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter read from ``model``'s structure, or None when it has no repeated blocks (most CNNs)."""
    try:
        return adapter_for(model)
    except PrunekitError:
        return None


def head_layout(model: nn.Module, adapter: ModelAdapter, attention: AttentionLayout,
                tensor_name: Callable[[torch.Tensor], str]) -> HeadLayout:
    modules = {role: model.get_submodule(path) for role, path in
               (("q", attention.q), ("k", attention.k), ("v", attention.v), ("o", attention.o))}
    heads_module = model.get_submodule(attention.heads_module)
    row_dim = 1 if attention.transposed else 0

    def projection(role: str) -> Projection:
        module = modules[role]
        return Projection(tensor_name(module.weight), tensor_name(module.bias) if module.bias is not None else None,
                          row_dim)

    def set_heads(num_heads: int, num_kv_heads: int) -> None:
        adapter.set_head_counts(heads_module, num_heads, num_kv_heads, (attention.num_heads, attention.num_kv_heads))

    if attention.num_heads % max(attention.num_kv_heads, 1):
        raise PrunekitError(f"{attention.name}: {attention.num_heads} query heads do not divide into "
                            f"{attention.num_kv_heads} key/value groups")
    o_transposed = type(modules["o"]).__name__ == "Conv1D"
    return HeadLayout(attention.name, projection("q"), projection("k"), projection("v"),
                      tensor_name(modules["o"].weight), attention.num_heads, attention.num_kv_heads, attention.head_dim,
                      set_heads, (attention.name, attention.q, attention.k, attention.v, attention.o),
                      attention.qkv_layout, attention.fused, 0 if o_transposed else 1,
                      tuple(tensor_name(model.get_parameter(name)) for name in attention.per_head))


@dataclass
class HeadLayouts:
    layouts: list[HeadLayout]
    whole: dict[str, list[str]]  # reason -> attentions whose heads stay whole for it

    def notes(self) -> list[str]:
        return [f"heads of {_listing(names)} are left whole: {reason}" for reason, names in self.whole.items()]

    def left_whole(self, module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for names in self.whole.values() for name in names)


def find_head_layouts(model: nn.Module, adapter: ModelAdapter | None,
                      tensor_name: Callable[[torch.Tensor], str]) -> HeadLayouts:
    """Head layouts of every attention the adapter describes (the structural adapter when none is given), and
    the attentions whose heads stay whole, by reason."""
    adapter = adapter if adapter is not None else structural_adapter(model)
    found = HeadLayouts([], {})
    if adapter is None:
        return found
    for attention in adapter.attention_layouts():
        blocker = adapter.head_blocker(attention)
        if blocker is not None:
            found.whole.setdefault(blocker, []).append(attention.name)
            continue
        found.layouts.append(head_layout(model, adapter, attention, tensor_name))
    return found


def _listing(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{names[0]} and {len(names) - 1} more attentions"

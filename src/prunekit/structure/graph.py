"""The dependency graph: which slices of which tensors must be removed together.

``build_graph`` traces the model (``prunekit.structure.trace``), takes the connected components
of the coupling graph, and turns them into *families*: sets of interchangeable units (the
neurons of one MLP, the output channels of one convolution and everything coupled to them, the
heads of one attention). A unit is a list of slices, one or more indices along one dimension of
each member tensor; removing a unit removes exactly those slices and keeps the model valid.

Components that touch the model's inputs or outputs are pinned; components whose channels were
reshaped into heads are left to the head layouts (``prunekit.structure.heads``) and frozen when
no layout claims them; a parameter used elementwise (a position embedding) joins a family only
when its coupled elements form whole slices along one dimension. Parts of a block the adapter says
structural pruning leaves whole (``ModelAdapter.whole_parts``: fused expert tensors, state-space and
convolution mixers) are traced as black boxes, so their tensors never join a family.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from prunekit.core.allocation.base import name_matches
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter
from prunekit.structure.heads import HeadLayout, HeadMode, find_head_layouts, structural_adapter
from prunekit.structure.trace import PINNED, Trace, WeightCall, trace

KINDS = ("channels", "heads", "hidden")


@dataclass
class Member:
    """Indices ``index[u]`` along ``dim`` of ``tensor`` belong to unit ``u``."""

    tensor: str
    dim: int
    index: torch.Tensor  # (units, per_unit) long

    @property
    def per_unit(self) -> int:
        return self.index.shape[1]


@dataclass
class Family:
    """Interchangeable units that share the same member tensors, removed by an allocation."""

    name: str
    kind: str  # channels | heads | hidden
    unit: str  # "channel", "head", "KV group", "query head", "group"
    members: list[Member]
    modules: tuple[str, ...]
    exact: bool = True  # False when a statistic over channels (LayerNorm, RMSNorm, mean) reads the units
    groups: int = 1  # units come in this many equal groups that keep equal counts (GQA query heads)
    heads: HeadLayout | None = None
    head_mode: HeadMode | None = None

    @property
    def size(self) -> int:
        return self.members[0].index.shape[0]

    def matches(self, patterns: Iterable[str]) -> bool:
        patterns = list(patterns)
        return bool(patterns) and (name_matches(self.name, patterns) or any(name_matches(m, patterns)
                                                                            for m in self.modules))

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "unit": self.unit, "units": self.size, "exact": self.exact,
                "groups": self.groups,
                "members": [f"{m.tensor}[dim {m.dim}] × {m.per_unit}" for m in self.members]}


@dataclass
class TensorInfo:
    name: str
    module: str
    attribute: str
    shape: tuple[int, ...]
    is_buffer: bool


@dataclass
class DependencyGraph:
    model: nn.Module
    families: list[Family]
    tensors: dict[str, TensorInfo]
    calls: list[WeightCall]
    frozen: list[str] = field(default_factory=list)
    grouped_convs: dict[str, int] = field(default_factory=dict)
    group_norms: dict[str, int] = field(default_factory=dict)
    example_inputs: tuple | dict = ()
    whole: dict[str, str] = field(default_factory=dict)  # module -> why it is left whole (traced as a black box)

    @cached_property
    def input_dims(self) -> dict[str, int]:
        """Weight -> the dimension that reads its layer's input channels (1, or 0 for a Conv1D stored (in, out))."""
        return {call.weight: call.input_dim for call in self.calls if call.kind in ("linear", "conv")}

    @cached_property
    def consumed_weights(self) -> frozenset[str]:
        """Weights applied by a Linear or an ungrouped convolution, whose columns read channels.

        An embedding table's columns *produce* channels; it is here only when the same tensor is
        also applied as a Linear (a tied output head)."""
        return frozenset(call.weight for call in self.calls if call.kind in ("linear", "conv") and call.groups == 1)

    def family(self, name: str) -> Family:
        for family in self.families:
            if family.name == name:
                return family
        raise PrunekitError(f"no prunable family named '{name}'")

    def tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        module = self.model.get_submodule(info.module) if info.module else self.model
        return getattr(module, info.attribute)

    def select(self, kinds: Iterable[str], ignore: Iterable[str] = ()) -> list[Family]:
        kinds = set(kinds)
        ignore = list(ignore)
        return [f for f in self.families if f.kind in kinds and not f.matches(ignore)]

    # ---- the cost model: exact parameter and MAC counts for any number of removed units ----

    def _removed_by_dim(self, removed: dict[str, int]) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for family in self.families:
            count = removed.get(family.name, 0)
            if count:
                for member in family.members:
                    counts[(member.tensor, member.dim)] += count * member.per_unit
        return counts

    def _numel_after(self, info: TensorInfo, removed_by_dim: dict[tuple[str, int], int]) -> int:
        total = 1
        for dim, size in enumerate(info.shape):
            total *= size - removed_by_dim.get((info.name, dim), 0)
        return total

    def parameter_count(self, removed: dict[str, int] | None = None) -> int:
        by_dim = self._removed_by_dim(removed or {})
        return sum(self._numel_after(info, by_dim) for info in self.tensors.values() if not info.is_buffer)

    def mac_count(self, removed: dict[str, int] | None = None) -> int:
        """Multiply-accumulates of the Linear and convolution calls of the example input."""
        by_dim = self._removed_by_dim(removed or {})
        return sum(call.positions * self._numel_after(self.tensors[call.weight], by_dim)
                   for call in self.calls if call.kind in ("linear", "conv"))

    def whole_parameters(self) -> int:
        """Parameters inside the modules left whole (``whole``)."""
        prefixes = tuple(f"{name}." for name in self.whole)
        return sum(math.prod(info.shape) for info in self.tensors.values()
                   if not info.is_buffer and prefixes and f"{info.module}.".startswith(prefixes))

    def summary(self) -> list[dict]:
        return [family.describe() for family in self.families]


def _canonical_names(model: nn.Module) -> tuple[dict[str, TensorInfo], dict[int, str]]:
    infos: dict[str, TensorInfo] = {}
    by_id: dict[int, str] = {}
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if id(tensor) in by_id:
                continue
            module, _, attribute = name.rpartition(".")
            infos[name] = TensorInfo(name, module, attribute, tuple(tensor.shape), kind == "buffer")
            by_id[id(tensor)] = name
    return infos, by_id


def _components(trace_result: Trace) -> np.ndarray:
    n = trace_result.num_ids
    pairs = trace_result.pairs
    if len(pairs) == 0:
        return np.arange(n)
    matrix = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(matrix, directed=False)
    return labels


def build_graph(model: nn.Module, example_inputs: tuple | dict, adapter: ModelAdapter | None = None,
                head_mode: HeadMode = "kv", strict: bool = True) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and group its prunable units into families.

    ``adapter`` names the attention heads and the parts left whole; without one, the adapter read from the
    model's structure does (none for models without repeated blocks). ``strict=False`` freezes the
    channels around an operation the tracer does not know instead of failing.
    """
    if head_mode not in ("kv", "query"):
        raise PrunekitError(f"unknown head mode '{head_mode}'; choose kv or query")
    adapter = adapter if adapter is not None else structural_adapter(model)
    whole = adapter.whole_parts() if adapter is not None else {}
    routers = adapter.routers() if adapter is not None else set()
    result = trace(model, example_inputs, strict=strict, sealed=whole, pinned=routers)
    comp = _components(result)
    infos, by_id = _canonical_names(model)
    pinned = int(comp[PINNED])
    frozen_comps: set[int] = {pinned}
    notes: list[str] = [f"unknown operation {op}: the channels it touches are left unpruned (strict=False)"
                        for op in result.frozen_ops]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, reason in whole.items():
        by_reason[reason].append(name)
    notes += [f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} left whole: {reason}"
              for reason, names in by_reason.items()]

    dim_comps: dict[tuple[str, int], np.ndarray] = {}
    element_keys: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for space in result.spaces:
        values = comp[space.start:space.start + space.size]
        if space.dim is not None:
            dim_comps[(space.tensor, space.dim)] = values
            continue
        grid = values.reshape(space.shape)
        varying = [d for d in range(grid.ndim) if grid.shape[d] > 1 and bool((grid != np.take(grid, [0], axis=d)).any())]
        if len(varying) == 1:
            dim = varying[0]
            key = (space.tensor, dim)
            if key in dim_comps:
                frozen_comps.update(np.unique(grid).tolist())
                frozen_comps.update(np.unique(dim_comps[key]).tolist())
                notes.append(f"{space.tensor}: used both as a weight and elementwise; left unpruned")
                continue
            dim_comps[key] = np.moveaxis(grid, dim, 0).reshape(grid.shape[dim], -1)[:, 0]
            element_keys[space.tensor].append(key)
        else:
            frozen_comps.update(np.unique(grid).tolist())
            if len(varying) > 1:
                notes.append(f"{space.tensor}: its elements are coupled along several dimensions; left unpruned")

    # component -> {(tensor, dim): indices}, leaving out pinned and frozen components early
    excluded = np.array(sorted(frozen_comps), dtype=np.int64)
    members_of: dict[int, dict[tuple[str, int], np.ndarray]] = defaultdict(dict)
    for key, values in dim_comps.items():
        positions = np.flatnonzero(~np.isin(values, excluded))
        if not len(positions):
            continue
        order = positions[np.argsort(values[positions], kind="stable")]  # by component, then by index
        sorted_values = values[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts.tolist(), ends.tolist()):
            members_of[int(sorted_values[start])][key] = order[start:end]

    split = set(np.unique(comp[result.split_ids]).tolist()) if len(result.split_ids) else set()
    mixing = set(np.unique(comp[result.mixing_ids]).tolist()) if len(result.mixing_ids) else set()
    call_order = {}
    for index, call in enumerate(result.calls):
        call_order.setdefault(call.weight, index)

    def tensor_name(tensor: torch.Tensor) -> str:
        return by_id[id(tensor)]

    families: list[Family] = []
    claimed: set[int] = set()
    heads = find_head_layouts(model, adapter, tensor_name)
    notes += heads.notes()
    for layout in heads.layouts:
        family, touched, reason = _head_family(layout, head_mode, dim_comps, members_of, frozen_comps, mixing)
        claimed |= touched
        if family is not None:
            families.append(family)
        else:
            notes.append(f"{layout.name}: heads left unpruned: {reason}")

    signatures: dict[tuple, list[int]] = defaultdict(list)
    for component, members in members_of.items():
        if component in frozen_comps or component in claimed:
            continue
        if component in split:
            continue
        signature = tuple(sorted((t, d, len(idx)) for (t, d), idx in members.items()))
        if not any(len(infos[t].shape) >= 2 for t, _, _ in signature):
            continue  # only norm parameters or biases: channels no weight produces or reads
        signatures[signature].append(component)
    for component in split - claimed - frozen_comps:
        tensors = sorted({t for t, _ in members_of.get(component, {})})
        if tensors and not all(heads.left_whole(infos[t].module) for t in tensors):
            notes.append(f"channels of {', '.join(tensors[:3])} are reshaped into heads that no head layout "
                         "describes; left unpruned")
    for signature, components in signatures.items():
        first_key = (signature[0][0], signature[0][1])
        components.sort(key=lambda c: int(members_of[c][first_key][0]))
        members = [Member(t, d, torch.as_tensor(np.stack([members_of[c][(t, d)] for c in components]), dtype=torch.long))
                   for t, d, _ in signature]
        modules = tuple(sorted({infos[m.tensor].module for m in members}, key=lambda m: _first_call(m, infos, call_order)))
        exact = not any(c in mixing for c in components)
        families.append(Family("", "channels" if exact else "hidden", "channel", members, modules, exact))
    _name_families(families, infos, call_order)
    families.sort(key=lambda f: (_first_call(f.modules[0], infos, call_order) if f.modules else 0, f.name))
    notes = list(dict.fromkeys(notes))
    return DependencyGraph(model, families, infos, result.calls, notes, result.grouped_convs, result.group_norms,
                           example_inputs, whole)


def _first_call(module: str, infos: dict[str, TensorInfo], call_order: dict[str, int]) -> int:
    orders = [order for name, order in call_order.items() if infos[name].module == module]
    return min(orders) if orders else 10**9


def _head_family(layout: HeadLayout, mode: HeadMode, dim_comps, members_of, frozen_comps, mixing):
    units = layout.units(mode)
    layout_tensors = layout.tensors()
    unit_of: dict[tuple[str, int], np.ndarray] = {}
    for number, unit in enumerate(units):
        for key, indices in unit.items():
            if key not in dim_comps:
                raise PrunekitError(f"{layout.name}: {key[0]} (dim {key[1]}) did not take part in the traced forward")
            unit_of.setdefault(key, np.full(len(dim_comps[key]), -1))[indices.numpy()] = number
    touched: set[int] = set()
    for key, owner in unit_of.items():
        touched.update(np.unique(dim_comps[key][owner >= 0]).tolist())
    # Every component a head touches must stay inside the attention's own tensors ...
    for component in touched:
        if component in frozen_comps or component not in members_of:
            return None, touched, "its channels meet the model's inputs or outputs or an unpruned part"
        outside = sorted({t for t, _ in members_of[component] if t not in layout_tensors})
        if outside:
            return None, touched, f"its heads are coupled to {outside[0]} outside the attention"
    # ... and, when whole key/value groups go, inside one unit (no component shared by two heads).
    if mode == "kv" or layout.heads_per_group == 1:
        touched_array = np.array(sorted(touched), dtype=np.int64)
        seen = []
        for key in {k for c in touched for k in members_of[c]}:
            comps = dim_comps[key]
            inside = np.isin(comps, touched_array)
            owner = unit_of.get(key, np.full(len(comps), -1))
            seen.append(np.stack([comps[inside], owner[inside]], axis=1))
        pairs = np.unique(np.concatenate(seen), axis=0)
        shared = np.unique(pairs[:, 0], return_counts=True)[1]
        if (pairs[:, 1] < 0).any() or (shared > 1).any():
            raise PrunekitError(f"{layout.name}: its heads share coupled channels with each other; "
                                "they cannot be removed one at a time")
    keys = list(units[0].keys())
    members = [Member(t, d, torch.stack([unit[(t, d)] for unit in units])) for t, d in keys]
    exact = not any(c in mixing for c in touched)
    family = Family(layout.name, "heads", layout.unit_name(mode), members, layout.modules, exact,
                    layout.groups(mode), layout, mode)
    return family, touched, None


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


def _name_families(families: list[Family], infos: dict[str, TensorInfo], call_order: dict[str, int]) -> None:
    head_names = {f.name for f in families if f.kind == "heads"}
    channel = [f for f in families if f.kind != "heads"]
    prefixes = {id(f): _common_prefix(list(f.modules)) for f in channel}
    counts: dict[str, int] = defaultdict(int)
    for f in channel:
        counts[prefixes[id(f)]] += 1
    used = set(head_names)
    for family in channel:
        prefix = prefixes[id(family)]
        if prefix and counts[prefix] == 1 and prefix not in used and len(family.modules) <= 4:
            name = prefix
        else:
            producers = [m.tensor for m in family.members if m.dim == 0 and len(infos[m.tensor].shape) >= 2]
            producers.sort(key=lambda t: call_order.get(t, 10**9))
            name = infos[producers[0]].module if producers else family.modules[0]
            if family.kind == "hidden" or len(family.modules) > 4:
                name = f"{name} (+{len(family.modules) - 1} coupled)"
        base, suffix = name, 2
        while name in used:
            name, suffix = f"{base}#{suffix}", suffix + 1
        used.add(name)
        family.name = name


def unit_costs(graph: DependencyGraph, families: list[Family], target: str = "params") -> dict[str, float]:
    """Parameters (or MACs) one unit of each family removes when nothing else is removed."""
    measure = graph.parameter_count if target == "params" else graph.mac_count
    base = measure()
    return {f.name: (base - measure({f.name: 1})) for f in families}


def fraction(part: float, whole: float) -> float:
    return part / whole if whole else math.nan

"""Physically remove units: slice every member tensor and update the attributes forwards read.

``shrink`` works in place on the graph's model. Parameters are resized through ``.data`` so a
tensor shared by two modules (a tied embedding and ``lm_head``) stays shared. After slicing,
the sizes modules keep as attributes (``in_features``, ``num_features``, ``groups``, the head
counts of an attention) are set from the new tensors, the model is run once on the graph's
example input, and the changed attributes and shapes are returned as a spec that
``prunekit.structure.saving`` writes next to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_parameters
from prunekit.models.base import ModelAdapter
from prunekit.models.layout import is_linear_like
from prunekit.structure.graph import DependencyGraph, Family
from prunekit.structure.trace import _flatten

_SIMPLE = (int, float, bool, str, tuple)


@dataclass
class ShrinkResult:
    removed: dict[str, list[int]]  # family -> removed unit indices (of the family before shrinking)
    widths: dict[str, tuple[int, int]]  # family -> (units before, units after)
    parameters_before: int
    parameters_after: int
    spec: dict[str, dict] = field(default_factory=dict)  # module -> attributes and tensor shapes after
    compensated: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.parameters_after / self.parameters_before

    def to_dict(self) -> dict:
        return {"widths": {k: list(v) for k, v in self.widths.items()}, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "removed_fraction": self.removed_fraction,
                "compensated": self.compensated}


def check_removal(graph: DependencyGraph, removal: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    checked: dict[str, torch.Tensor] = {}
    for name, units in removal.items():
        family = graph.family(name)
        index = torch.as_tensor(list(units), dtype=torch.long).unique()
        if index.numel() == 0:
            continue
        if int(index.min()) < 0 or int(index.max()) >= family.size:
            raise PrunekitError(f"{name} has {family.size} {family.unit}s; unit {int(index.max())} does not exist")
        if index.numel() >= family.size:
            raise PrunekitError(f"removing every {family.unit} of {name} would empty it; keep at least one")
        if family.groups > 1:
            per_group = family.size // family.groups
            counts = torch.bincount(index // per_group, minlength=family.groups)
            if not bool((counts == counts[0]).all()):
                raise PrunekitError(f"{name}: grouped-query attention needs the same number of {family.unit}s removed "
                                    f"from each of its {family.groups} key/value groups, got {counts.tolist()}")
        checked[name] = index
    return checked


def _snapshot(model: nn.Module) -> dict[str, dict]:
    state = {}
    for name, module in model.named_modules():
        attributes = {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _SIMPLE)
                      and not (isinstance(v, tuple) and not all(isinstance(x, (int, float, bool, str)) for x in v))}
        tensors = {k: tuple(v.shape) if v is not None else None for k, v in
                   list(module._parameters.items()) + list(module._buffers.items())}
        state[name] = {"attributes": attributes, "tensors": tensors, "type": type(module).__name__}
    return state


def _diff(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    changes = {}
    for name, new in after.items():
        old = before.get(name)
        if old is None:
            continue
        attributes = {k: v for k, v in new["attributes"].items() if old["attributes"].get(k) != v}
        if attributes or new["tensors"] != old["tensors"]:
            changes[name] = {"type": new["type"], "attributes": attributes,
                             "tensors": {k: list(v) if v is not None else None for k, v in new["tensors"].items()}}
    return changes


def _owner(graph: DependencyGraph, tensor: str) -> tuple[nn.Module, str]:
    info = graph.tensors[tensor]
    return (graph.model.get_submodule(info.module) if info.module else graph.model), info.attribute


def compensation_targets(graph: DependencyGraph, weights, adapter: ModelAdapter | None = None) -> dict[str, str]:
    """Consumer weight -> the module whose bias absorbs FLAP's compensation for its removed inputs.

    Only an ``nn.Linear`` (or transformers' ``Conv1D``) or ungrouped convolution that owns the weight and is the
    only module applying it qualifies. The model's output head never does: its bias would be vocabulary-sized
    and no Hugging Face config can describe it (plain ``from_pretrained`` would be lost), and a tied
    head's weight is the embedding table, whose module has no bias to add.
    """
    calls: dict[str, list] = {}
    for call in graph.calls:
        calls.setdefault(call.weight, []).append(call)
    tables = {call.weight for call in graph.calls if call.kind == "embedding"}
    head = adapter.head() if adapter is not None else None
    targets = {}
    for weight in weights:
        uses = calls.get(weight, [])
        if not uses or weight in tables or len({c.module for c in uses}) != 1:
            continue
        if any(c.kind not in ("linear", "conv") or c.groups != 1 for c in uses):
            continue
        name = uses[0].module
        module = graph.model.get_submodule(name) if name else graph.model
        if not (is_linear_like(module) or isinstance(module, nn.modules.conv._ConvNd)) \
                or module.weight is not graph.tensor(weight):
            continue
        if head is not None and module is head:
            continue
        targets[weight] = name
    return targets


def _compensation_deltas(graph: DependencyGraph, removed_by_dim: dict[tuple[str, int], torch.Tensor],
                         means: Mapping[str, torch.Tensor], targets: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation: a removed input channel j of a consumer contributes its mean,
    ``W[:, j] · E[x_j]``, to the consumer's bias, so the output keeps its expected value.
    Returns weight name -> bias change over the consumer's rows before slicing."""
    deltas = {}
    for (tensor, dim), index in removed_by_dim.items():
        input_dim = graph.input_dims.get(tensor, 1)
        if dim != input_dim or tensor not in targets or tensor not in means:
            continue
        weight = graph.tensor(tensor).detach()
        weight = weight.t() if input_dim == 0 else weight  # rows first (a Conv1D stores (in, out))
        columns = weight.index_select(1, index.to(weight.device))
        if columns.dim() > 2:  # convolution: constant inputs pass through the summed kernel (borders aside)
            columns = columns.flatten(2).sum(-1)
        deltas[tensor] = columns @ means[tensor].to(weight)[index]
    return deltas


def _apply_compensation(graph: DependencyGraph, deltas: dict[str, torch.Tensor],
                        removed_by_dim: dict[tuple[str, int], torch.Tensor], adapter: ModelAdapter | None,
                        targets: Mapping[str, str]) -> list[str]:
    done = []
    for tensor, delta in deltas.items():
        rows = removed_by_dim.get((tensor, 1 - graph.input_dims.get(tensor, 1)))  # the output rows' dimension
        if rows is not None:
            keep = torch.ones(delta.shape[0], dtype=torch.bool)
            keep[rows] = False
            delta = delta[keep.to(delta.device)]
        module_name = targets[tensor]
        module = graph.model.get_submodule(module_name) if module_name else graph.model
        if module.bias is None:
            siblings = adapter.bias_siblings(module_name) if adapter is not None else [module_name]
            for sibling in siblings:
                owner = graph.model.get_submodule(sibling)
                if getattr(owner, "bias", None) is None:
                    owner.bias = nn.Parameter(torch.zeros(owner.weight.shape[0], dtype=owner.weight.dtype,
                                                          device=owner.weight.device),
                                              requires_grad=owner.weight.requires_grad)
        module.bias.data += delta
        done.append(module_name)
    return done


def _sync(module: nn.Module, before: dict) -> None:
    """Sizes a module keeps as attributes, read back from its (sliced) tensors."""
    old = before["attributes"]
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        weight = module.weight
        old_groups = old.get("groups", 1)
        module.out_channels = weight.shape[0]
        if old_groups > 1:  # whole groups were removed; the per-group sizes stay
            module.groups = weight.shape[0] // (old["out_channels"] // old_groups)
        module.in_channels = module.groups * weight.shape[1]
    elif isinstance(module, (nn.modules.batchnorm._NormBase,)):
        tensor = module.weight if module.weight is not None else module.running_mean
        if tensor is not None:
            module.num_features = tensor.shape[0]
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            per_group = old["num_channels"] // old["num_groups"]
            module.num_channels = module.weight.shape[0]
            module.num_groups = module.num_channels // per_group
    elif isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif type(module).__name__ == "Conv1D" and "nf" in old:  # transformers' Conv1D: weight (nx in, nf out)
        module.nx, module.nf = module.weight.shape
    # Hugging Face MLPs record their width (not read by the forward, but saved in reprs and configs).
    down = getattr(module, "down_proj", None)
    if isinstance(down, nn.Linear) and "intermediate_size" in old:
        module.intermediate_size = down.in_features


def zero_units(graph: DependencyGraph, family: Family, units: Sequence[int]) -> None:
    """Set every slice of the given units to zero (in place): the reference for exactness checks."""
    index = torch.as_tensor(list(units), dtype=torch.long)
    with torch.no_grad():
        for member in family.members:
            tensor = graph.tensor(member.tensor)
            positions = member.index[index].reshape(-1)
            tensor.index_fill_(member.dim, positions, 0)


def removed_by_dimension(graph: DependencyGraph, checked: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """(tensor, dim) -> every index removed along it, over all families (checked unit indices)."""
    parts: dict[tuple[str, int], list[torch.Tensor]] = {}
    for name, index in checked.items():
        for member in graph.family(name).members:
            parts.setdefault((member.tensor, member.dim), []).append(member.index[index].reshape(-1))
    return {key: torch.cat(found).unique() for key, found in parts.items()}


def shrink(graph: DependencyGraph, removal: Mapping[str, Sequence[int]],
           compensation: Mapping[str, torch.Tensor] | None = None, adapter: ModelAdapter | None = None,
           check: bool = True) -> ShrinkResult:
    """Remove the given units (family name -> unit indices) from the graph's model, in place.

    ``compensation`` maps a consumer weight's name to the mean of its input channels; removed
    input channels then move their mean contribution into the consumer's bias (FLAP), where
    ``compensation_targets`` allows one. The graph
    describes the model as it was: build a new one to prune again.
    """
    model = graph.model
    checked = check_removal(graph, removal)
    parameters_before = count_parameters(model)
    merged = removed_by_dimension(graph, checked)
    before = _snapshot(model)
    # A tied tensor (embedding and lm_head) has one canonical owner; every module holding it keeps sizes to update.
    sliced = {id(graph.tensor(name)) for name, _ in merged}
    touched = {name for name, module in model.named_modules()
               if any(t is not None and id(t) in sliced for t in [*module._parameters.values(), *module._buffers.values()])}
    targets = compensation_targets(graph, compensation, adapter) if compensation else {}
    deltas = _compensation_deltas(graph, merged, compensation, targets) if compensation else {}
    with torch.no_grad():
        for (tensor_name, dim), index in merged.items():
            module, attribute = _owner(graph, tensor_name)
            tensor = getattr(module, attribute)
            keep_mask = torch.ones(tensor.shape[dim], dtype=torch.bool)
            keep_mask[index] = False
            keep = keep_mask.nonzero().squeeze(1).to(tensor.device)
            if attribute in module._parameters:
                tensor.data = tensor.data.index_select(dim, keep).contiguous()
                tensor.grad = None
            else:
                module._buffers[attribute] = tensor.index_select(dim, keep).contiguous()
    compensated = _apply_compensation(graph, deltas, merged, adapter, targets) if deltas else []
    touched |= {graph.tensors[t].module for t, _ in merged}
    for name in touched:
        module = model.get_submodule(name) if name else model
        _sync(module, before[name])
    for name, index in checked.items():
        family = graph.family(name)
        if family.heads is not None:
            family.heads.apply(family.head_mode, family.size - index.numel())
    widths = {name: (graph.family(name).size, graph.family(name).size - index.numel()) for name, index in checked.items()}
    spec = _diff(before, _snapshot(model))
    if check:
        run_check(model, graph.example_inputs)
    return ShrinkResult({k: v.tolist() for k, v in checked.items()}, widths, parameters_before,
                        count_parameters(model), spec, compensated)


def run_check(model: nn.Module, example_inputs: tuple | dict) -> None:
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
        for tensor in _flatten(output):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise PrunekitError("the shrunk model produces NaN or inf")
    except PrunekitError:
        raise
    except Exception as exc:
        raise PrunekitError(f"the shrunk model no longer runs ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            "a module probably keeps a size attribute prunekit does not know") from None
    finally:
        model.train(was_training)

"""The model adapter: where a model keeps its blocks, embeddings, final norm and head, and what a block holds.

One adapter serves weights, structure, tokens and kv. It reads the layout from the model's
structure (``prunekit.models.layout``), so a decoder no one wrote a file for works as it is.
A family file (``prunekit.models.families``) subclasses it only for what structure cannot reveal:
the row order of a fused query/key/value projection, a config that cannot describe removed heads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

from torch import nn

from prunekit.core.calibration import Target
from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError
from prunekit.models.layout import (
    CONFIG_HEADS,
    CONFIG_EMBEDDING,
    CONFIG_HIDDEN,
    CONFIG_KV_HEADS,
    CONFIG_LAYERS,
    CONFIG_MLP,
    AttentionParts,
    ExpertsParts,
    MLPParts,
    config_value,
    find_attention,
    find_blocks,
    find_experts,
    find_final_norm,
    find_mlp,
    is_linear_like,
    is_norm,
    linear_shape,
    module_path,
    text_config,
)

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model family", ("prunekit.models.families",))

QKVLayout = Literal["stacked", "per_head", "per_group", "opaque"]
# Attributes an attention's forward may read for its head counts, under the names families use.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_heads")
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size", "head_size")
# Attributes an attention's forward may read for the width of all its queries (heads × head size) or of its
# keys and values, under the names families use (GPT-2 splits c_attn by split_size, GPTBigCode by embed_dim and
# kv_dim, BERT reshapes by all_head_size). Several also name the hidden size; they are updated only where they
# held the heads' width.
QUERY_WIDTH_ATTRIBUTES = ("all_head_size", "split_size", "embed_dim", "hidden_size", "dim")
KV_WIDTH_ATTRIBUTES = ("kv_dim",)
OPAQUE_QKV = "the order of its fused query/key/value rows is not one prunekit removes heads from"
UNKNOWN_ATTENTION = ("an attention without separate or fused query/key/value projections (latent attention, say): "
                     "its internal widths are kept in attributes prunekit does not know")
FUSED_EXPERTS = "fused expert tensors (experts × rows × columns) keep one width for every expert"
MIXER = ("neither attention nor an MLP (a state-space or convolution mixer): structural pruning does not follow "
         "channels coupled through its scan or convolution")


@dataclass(frozen=True)
class AttentionLayout:
    """One attention's projections (module paths from the model root) and head counts.

    ``q``, ``k`` and ``v`` are the same module when one fused projection produces all three; its
    rows are then ordered as ``qkv_layout`` says: ``stacked`` (all queries, then keys, then values),
    ``per_head`` ([q, k, v] of each head in turn), ``per_group`` (each key/value group's queries, its key,
    its value) or ``opaque`` (an order prunekit does not address). ``transposed``: the projections store their
    weight as (in, out) (transformers' ``Conv1D``). ``per_head``: parameters of the attention holding one value
    per query head (GPT-OSS's attention sinks), which go with their head.
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
    fused: bool = False
    qkv_layout: QKVLayout = "stacked"
    transposed: bool = False
    block: int = -1
    per_head: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockParts:
    attention: AttentionParts | None
    mlp: MLPParts | None
    experts: tuple[ExpertsParts, ...] = ()


class ModelAdapter:
    """A model's layout, read from its structure (see the module docstring).

    ``blocks`` names the block list explicitly (``--blocks``) where structure is ambiguous.
    """

    model_types: ClassVar[tuple[str, ...]] = ()  # families a subclass covers (config.model_type)
    qkv_layout: ClassVar[QKVLayout] = "stacked"

    def __init__(self, model: nn.Module, blocks: str | None = None):
        self.model = model
        found = find_blocks(model, blocks)
        self.blocks_path = found.path
        self.embeddings_path = module_path(model, _accessor(model, "get_input_embeddings"))
        self.head_path = module_path(model, _accessor(model, "get_output_embeddings"))
        self.final_norm_path = find_final_norm(model, self.blocks_path)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return bool(cls.model_types) and getattr(config, "model_type", None) in cls.model_types

    # ---- where things are ----------------------------------------------------------------------
    def _get(self, path: str | None) -> nn.Module | None:
        if path is None:
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
            raise PrunekitError(f"{type(self.model).__name__} has no blocks at '{self.blocks_path}'")
        return blocks

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}" if self.blocks_path else str(index)

    def embeddings(self) -> nn.Module | None:
        return self._get(self.embeddings_path)

    def final_norm(self) -> nn.Module | None:
        return self._get(self.final_norm_path)

    def head(self) -> nn.Module | None:
        return self._get(self.head_path)

    def heads_are_tied(self) -> bool:
        head, embeddings = self.head(), self.embeddings()
        if head is None or embeddings is None:
            return False
        return getattr(head, "weight", None) is getattr(embeddings, "weight", False)

    @property
    def config(self):
        return text_config(self.model)

    # ---- inside the blocks -----------------------------------------------------------------------
    def block_parts(self, index: int) -> BlockParts:
        return self._parts[index]

    @cached_property
    def _parts(self) -> list[BlockParts]:
        return [BlockParts(find_attention(block), find_mlp(block), tuple(find_experts(block)))
                for block in self.blocks()]

    def routers(self) -> set[str]:
        """Full names of the layers that route tokens to experts: pruning them would change the routing."""
        names = set()
        for index in range(len(self.blocks())):
            for experts in self.block_parts(index).experts:
                names.update(f"{self.block_name(index)}.{router}" for router in experts.routers)
        return names

    def block_weights(self, index: int) -> list[Target]:
        """Every weight of block ``index`` one-shot pruning may remove from: its linear layers (``Conv1D``
        included) and each expert's slice of fused 3-D expert tensors; routers are left out.

        The block's other parts (convolutions, state-space parameters, norms) are not linear and stay dense.
        """
        block = self.blocks()[index]
        prefix = self.block_name(index)
        parts = self.block_parts(index)
        routers = {f"{prefix}.{router}" for experts in parts.experts for router in experts.routers}
        containers = {}
        for experts in parts.experts:
            container = block.get_submodule(experts.container) if experts.container else block
            containers[f"{prefix}.{experts.module}"] = (experts, container)
        found: list[Target] = []
        for local, module in block.named_modules():
            name = f"{prefix}.{local}" if local else prefix
            if name in containers:
                experts, container = containers[name]
                if experts.fused:
                    for tensor in experts.tensors:
                        for expert in range(getattr(module, tensor).shape[0]):
                            found.append(Target(f"{name}.{tensor}.{expert}", module, index, tensor, expert,
                                                experts.transposed, container, tensor))
                continue
            if not is_linear_like(module) or name in routers:
                continue
            owner = next(((c, e) for path, (e, c) in containers.items()
                          if not e.fused and name.startswith(path + ".")), None)
            transposed = type(module).__name__ == "Conv1D"
            if owner is not None:
                container, experts_path = owner[0], next(p for p in containers if name.startswith(p + "."))
                stage = name[len(experts_path) + 1:].partition(".")[2]  # the layer's name inside its expert
                found.append(Target(name, module, index, "weight", None, transposed, container, stage))
            else:
                found.append(Target(name, module, index, "weight", None, transposed))
        return found

    def attention_layouts(self) -> list[AttentionLayout]:
        """Every block's attention whose heads prunekit can address, with its head counts."""
        layouts = []
        for index in range(len(self.blocks())):
            layout = self.attention_layout(index)
            if layout is not None:
                layouts.append(layout)
        return layouts

    def attention_layout(self, index: int) -> AttentionLayout | None:
        """Block ``index``'s attention, or None when it has none (hybrid blocks) or it is not one prunekit can
        address per head (latent attention, projections under unknown names)."""
        parts = self.block_parts(index).attention
        if parts is None or parts.o is None or not ((parts.q and parts.k and parts.v) or parts.qkv):
            return None
        block = self.blocks()[index]
        prefix = self.block_name(index)
        heads_module = block.get_submodule(parts.heads_module)
        if parts.qkv:
            fused = block.get_submodule(parts.qkv)
            heads, kv_heads, head_dim = self.fused_head_counts(heads_module, fused)
            path = f"{prefix}.{parts.qkv}"
            q = k = v = path
            transposed = type(fused).__name__ == "Conv1D"
        else:
            modules = [block.get_submodule(p) for p in (parts.q, parts.k, parts.v)]
            heads, kv_heads, head_dim = self.head_counts(heads_module, modules[0], modules[1])
            q, k, v = (f"{prefix}.{p}" for p in (parts.q, parts.k, parts.v))
            transposed = type(modules[0]).__name__ == "Conv1D"
        heads_path = f"{prefix}.{parts.heads_module}".rstrip(".")
        per_head = tuple(f"{heads_path}.{name}" for name, parameter in heads_module.named_parameters(recurse=False)
                         if parameter.dim() == 1 and parameter.numel() == heads)
        return AttentionLayout(f"{prefix}.{parts.module}", heads_path, q, k, v, f"{prefix}.{parts.o}", heads, kv_heads,
                               head_dim, bool(parts.qkv), self.qkv_layout, transposed, index, per_head)

    def _head_dim(self, heads_module: nn.Module, heads: int | None) -> int:
        for name in HEAD_DIM_ATTRIBUTES:
            value = getattr(heads_module, name, None)
            if isinstance(value, int) and value > 0:
                return value
        config = self.config
        value, _ = config_value(config, ("head_dim",))
        if isinstance(value, int) and value > 0:
            return value
        hidden, _ = config_value(config, CONFIG_HIDDEN)
        config_heads, _ = config_value(config, CONFIG_HEADS)
        if isinstance(hidden, int) and isinstance(config_heads, int) and config_heads > 0:
            return hidden // config_heads
        raise PrunekitError(f"cannot tell the head size of {type(heads_module).__name__}: neither the module nor the "
                            "config says it")

    def head_counts(self, heads_module: nn.Module, q: nn.Module, k: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head size) of an attention with separate projections, from its weights."""
        head_dim = self._head_dim(heads_module, None)
        q_rows, k_rows = linear_shape(q)[0], linear_shape(k)[0]
        if q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % max(k_rows // head_dim, 1):
            raise PrunekitError(f"{type(heads_module).__name__}: {q_rows} query and {k_rows} key rows do not form "
                                f"whole heads of {head_dim}")
        return q_rows // head_dim, k_rows // head_dim, head_dim

    def fused_head_counts(self, heads_module: nn.Module, fused: nn.Module) -> tuple[int, int, int]:
        """Head counts of a fused query/key/value projection: the config's (or the module's), checked against its rows.

        An attention that keeps no head count of its own (GPT-NeoX reshapes by head size alone) may have lost
        heads since the config was written: with one key and value per head (or one for all), its rows tell."""
        heads = _first_int(heads_module, HEAD_ATTRIBUTES)
        kv_heads = _first_int(heads_module, KV_HEAD_ATTRIBUTES)
        config = self.config
        counted_by_module = heads is not None
        if heads is None:
            heads, _ = config_value(config, CONFIG_HEADS)
        if kv_heads is None:
            if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
                kv_heads = 1
            else:
                kv_heads, _ = config_value(config, CONFIG_KV_HEADS)
        kv_heads = kv_heads or heads
        head_dim = self._head_dim(heads_module, heads)
        rows = linear_shape(fused)[0]
        if isinstance(heads, int) and not counted_by_module and rows != (heads + 2 * kv_heads) * head_dim \
                and rows % head_dim == 0:
            total = rows // head_dim
            if kv_heads == heads and total % 3 == 0:
                heads = kv_heads = total // 3
            elif kv_heads == 1 and total > 2:
                heads = total - 2
        if not isinstance(heads, int) or rows != (heads + 2 * kv_heads) * head_dim:
            raise PrunekitError(f"{type(heads_module).__name__}: the fused projection has {rows} rows, not the "
                                f"({heads} + 2 × {kv_heads}) heads × {head_dim} the config describes")
        return heads, kv_heads, head_dim

    def head_blocker(self, attention: AttentionLayout) -> str | None:
        """Why ``attention``'s heads cannot be removed (they stay whole, and the notes say why), or None."""
        if attention.fused and attention.qkv_layout == "opaque":
            return OPAQUE_QKV
        return None

    def set_head_counts(self, heads_module: nn.Module, num_heads: int, num_kv_heads: int,
                        previous: tuple[int, int] | None = None) -> None:
        """Update the attributes an attention's forward reads after heads were removed.

        ``previous`` (query heads, key/value heads before) lets the widths kept as attributes (``QUERY_WIDTH_ATTRIBUTES``,
        ``KV_WIDTH_ATTRIBUTES``) follow, where they held the heads' width."""
        head_dim = self._head_dim(heads_module, num_heads)
        for attribute in HEAD_ATTRIBUTES:
            if isinstance(getattr(heads_module, attribute, None), int):
                setattr(heads_module, attribute, num_heads)
        for attribute in KV_HEAD_ATTRIBUTES:
            if isinstance(getattr(heads_module, attribute, None), int):
                setattr(heads_module, attribute, num_kv_heads)
        if isinstance(getattr(heads_module, "num_key_value_groups", None), int):
            heads_module.num_key_value_groups = num_heads // num_kv_heads
        if previous is None:
            if isinstance(getattr(heads_module, "all_head_size", None), int):
                heads_module.all_head_size = num_heads * head_dim
            return
        for attributes, before, after in ((QUERY_WIDTH_ATTRIBUTES, previous[0], num_heads),
                                          (KV_WIDTH_ATTRIBUTES, previous[1], num_kv_heads)):
            for attribute in attributes:
                value = getattr(heads_module, attribute, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == before * head_dim:
                    setattr(heads_module, attribute, after * head_dim)

    def whole_parts(self) -> dict[str, str]:
        """Modules structural pruning leaves whole (traced as black boxes), each with the reason.

        Fused expert tensors give every expert one width, so no expert can lose its own channels; an attention
        without the projections prunekit addresses (latent attention) keeps its internal widths in attributes;
        and a part of a transformer block that is neither its attention, its MLP nor a norm (the state-space or
        short-convolution mixers of hybrid models) couples its channels through a scan prunekit does not follow.
        Blocks without an attention or MLP (a CNN's) have no such parts.
        """
        whole: dict[str, str] = {}
        for index, block in enumerate(self.blocks()):
            prefix = self.block_name(index)
            parts = self.block_parts(index)
            for experts in parts.experts:
                if experts.fused:
                    whole[f"{prefix}.{experts.module}"] = FUSED_EXPERTS
            attention = parts.attention
            projections = attention is not None and bool((attention.q and attention.k and attention.v) or attention.qkv)
            if not (projections or parts.mlp is not None or parts.experts):
                continue
            if attention is not None and self.attention_layout(index) is None:
                whole[f"{prefix}.{attention.module}"] = UNKNOWN_ATTENTION
            addressed = {attention.module.partition(".")[0]} if attention is not None else set()
            if parts.mlp is not None:
                paths = [parts.mlp.module] if parts.mlp.module else \
                    [p for p in (parts.mlp.gate, parts.mlp.up, parts.mlp.down, parts.mlp.gate_up) if p]
                addressed |= {path.partition(".")[0] for path in paths}
            addressed |= {(experts.container or experts.module).partition(".")[0] for experts in parts.experts}
            for name, child in block.named_children():
                if name in addressed or is_norm(child) or not any(True for _ in child.parameters()):
                    continue
                whole[f"{prefix}.{name}"] = MIXER
        return whole

    # ---- structural pruning: what the config must say afterwards ------------------------------------
    def bias_siblings(self, module_name: str) -> list[str]:
        """Modules that must gain a (zero) bias together with ``module_name`` so one config flag describes them."""
        config = self.config
        for flag, part in (("attention_bias", "attention"), ("mlp_bias", "mlp")):
            if not hasattr(config, flag):
                continue
            members = self._part_members(part)
            if module_name in members:
                return members
        return [module_name]

    def _part_members(self, part: str) -> list[str]:
        names = []
        for index in range(len(self.blocks())):
            parts = self.block_parts(index)
            prefix = self.block_name(index)
            if part == "attention" and parts.attention is not None:
                found = parts.attention
                names += [f"{prefix}.{p}" for p in (found.q, found.k, found.v, found.qkv, found.o) if p]
            elif part == "mlp" and parts.mlp is not None:
                found = parts.mlp
                names += [f"{prefix}.{p}" for p in (found.gate, found.up, found.gate_up, found.down) if p]
        return names

    def mlp_widths(self) -> list[int]:
        widths = []
        for index, block in enumerate(self.blocks()):
            parts = self.block_parts(index).mlp
            if parts is not None and parts.down is not None and is_linear_like(block.get_submodule(parts.down)):
                widths.append(linear_shape(block.get_submodule(parts.down))[1])
        return widths

    def structure_config(self) -> tuple[dict, list[str]]:
        """Config updates describing the model's current widths, and the reasons (if any) why a plain
        ``from_pretrained`` cannot rebuild it from its config (for example widths that differ by layer)."""
        config = self.config
        blocks = self.blocks()
        updates: dict = {}
        blockers: list[str] = []
        _, layers_key = config_value(config, CONFIG_LAYERS)
        updates[layers_key or "num_hidden_layers"] = len(blocks)
        widths = set(self.mlp_widths())
        _, mlp_key = config_value(config, CONFIG_MLP)
        if len(widths) == 1 and mlp_key:
            updates[mlp_key] = widths.pop()
        elif len(widths) > 1:
            blockers.append(f"MLP widths differ across layers ({min(widths)}..{max(widths)})")
        heads = {(layout.num_heads, layout.num_kv_heads, layout.head_dim) for layout in self.attention_layouts()}
        configured, heads_key = config_value(config, CONFIG_HEADS)
        hidden, _ = config_value(config, CONFIG_HIDDEN)
        # Without a head_dim of its own (stored, not a property), a config derives the head size from
        # hidden_size / heads: fewer heads would mean larger ones.
        derived = not isinstance(vars(config).get("head_dim"), int) and isinstance(hidden, int)
        uniform_head_dim = next(iter(heads))[2] if len(heads) == 1 else None
        if len(heads) == 1:
            num_heads, num_kv_heads, head_dim = heads.pop()
            if derived and num_heads != configured and hidden // num_heads != head_dim:
                blockers.append("the config derives the head size from the hidden size and the number of heads, so "
                                "it cannot describe removed heads")
            else:
                _, kv_key = config_value(config, CONFIG_KV_HEADS)
                if heads_key:
                    updates[heads_key] = num_heads
                if kv_key:
                    updates[kv_key] = num_kv_heads
                if getattr(config, "head_dim", None) is not None:
                    updates["head_dim"] = head_dim
        elif heads:
            blockers.append("head counts differ across layers")
        embeddings = self.embeddings()
        _, hidden_key = config_value(config, CONFIG_EMBEDDING + CONFIG_HIDDEN)
        if embeddings is not None and hidden_key and hasattr(embeddings, "embedding_dim"):
            updates[hidden_key] = embeddings.embedding_dim
            # A narrower stream (SliceGPT) leaves the heads as they were: a config that derives the head size
            # from the hidden size must be told it, or it rebuilds smaller heads and other rotary tables.
            if derived and embeddings.embedding_dim != hidden and "head_dim" not in updates and uniform_head_dim:
                updates["head_dim"] = uniform_head_dim
        for flag, part in (("attention_bias", "attention"), ("mlp_bias", "mlp")):
            if not hasattr(config, flag):
                continue
            members = [self.model.get_submodule(name) for name in self._part_members(part)]
            has_bias = [getattr(module, "bias", None) is not None for module in members]
            if has_bias and all(has_bias):
                updates[flag] = True
            elif any(has_bias):
                blockers.append(f"only some {part} projections have a bias, which {flag} cannot describe")
        # Quantities a family derives from others (Falcon's head_dim) are read-only properties of its config.
        return {k: v for k, v in updates.items() if not isinstance(getattr(type(config), k, None), property)}, blockers

    def describe(self) -> dict:
        config = getattr(self.model, "config", None)
        return {"family": type(self).__name__, "model_type": getattr(config, "model_type", None),
                "architecture": type(self.model).__name__, "blocks": len(self.blocks()),
                "blocks_path": self.blocks_path}


def _first_int(module: nn.Module, names) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _accessor(model: nn.Module, name: str) -> nn.Module | None:
    getter = getattr(model, name, None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


# The block list a user named (``--blocks``) stays the model's: every later look at it (the job's steps,
# the pipeline, the saver) finds the same blocks without the name being passed along.
_NAMED_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def adapter_for(model: nn.Module, blocks: str | None = None) -> ModelAdapter:
    """The adapter of ``model``: a family file's where one covers its ``model_type``, else read from structure.

    ``blocks`` (the ``--blocks`` option) names the block list; once named it holds for this model object.
    """
    if blocks:
        blocks = blocks.strip()
    blocks = blocks or _NAMED_BLOCKS.get(model)
    for name in ADAPTERS.names():
        adapter_cls = ADAPTERS.get(name)
        if adapter_cls.matches(model):
            adapter = adapter_cls(model, blocks)
            break
    else:
        adapter = ModelAdapter(model, blocks)
    if blocks:
        _NAMED_BLOCKS[model] = blocks
    return adapter


__all__ = ["ADAPTERS", "AttentionLayout", "BlockParts", "ModelAdapter", "adapter_for"]

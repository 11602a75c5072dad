"""Reading a model's layout from its structure: blocks, embeddings, head, final norm, attention, MLP, experts.

Nothing here looks at ``model_type``. The decoder blocks are the ``nn.ModuleList`` of repeated blocks
holding most of the parameters; the embeddings and head come from the Hugging Face accessors; the
final norm is the normalisation the blocks' parent registers after them; inside a block, attention
and MLP projections are recognised by the names every family in transformers uses for them, and
head counts read from the config are checked against the weights. What structure cannot reveal
(the order of rows in a fused query/key/value projection, say) is a family file's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from prunekit.errors import PrunekitError

# Leaf names of projections, as transformers' families spell them (first match wins).
QUERY_NAMES = ("q_proj", "query", "q", "wq", "q_lin", "query_proj", "q_a_proj")
KEY_NAMES = ("k_proj", "key", "k", "wk", "k_lin", "key_proj")
VALUE_NAMES = ("v_proj", "value", "v", "wv", "v_lin", "value_proj")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv", "wqkv")
OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "output_proj", "proj")
GATE_NAMES = ("gate_proj", "w1", "wi_0", "fc_gate")
UP_NAMES = ("up_proj", "w3", "wi_1", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "lin1", "wi")
DOWN_NAMES = ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "lin2", "wo")
FUSED_GATE_UP_NAMES = ("gate_up_proj",)
ATTENTION_HINTS = ("attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn", "feedforward")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm", "layer_norm",
                    "embedding_norm", "layernorm")
# Config attributes that hold the same quantity under the names different families use.
CONFIG_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Config lists with one entry a layer (whether it is sliding or full attention, a convolution, uses rotary
# positions), and lists naming layers by index (which layers are attention in a hybrid): both follow removed blocks.
CONFIG_PER_LAYER = ("layer_types", "no_rope_layers", "layers_block_type")
CONFIG_LAYER_INDICES = ("full_attn_idxs", "attn_layer_indices", "mlp_only_layers", "moe_layer_indices")
CONFIG_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads")
CONFIG_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "num_kv")
CONFIG_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
# Factorised embeddings (ALBERT, ELECTRA) have their own width, projected to the hidden size after the table.
CONFIG_EMBEDDING = ("embedding_size",)
CONFIG_MLP = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "decoder_ffn_dim")


def text_config(model: nn.Module):
    """The config describing the language part (``get_text_config`` of multimodal configs), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def config_value(config, names: Iterable[str]):
    """The first of ``names`` the config sets to a value (not None), with the name it came from."""
    if config is None:
        return None, None
    for name in names:
        try:
            value = getattr(config, name)
        except AttributeError:
            continue
        if value is not None:
            return value, name
    return None, None


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def weight_rows_first(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): a view, so in-place changes reach the module."""
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    rows, columns = weight_rows_first(module).shape
    return int(rows), int(columns)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _children_named(module: nn.Module, names: Iterable[str]) -> Iterator[tuple[str, nn.Module]]:
    for name in names:
        child = module._modules.get(name)
        if child is not None:
            yield name, child


@dataclass(frozen=True)
class BlockList:
    path: str
    blocks: nn.ModuleList


def find_blocks(model: nn.Module, path: str | None = None) -> BlockList:
    """The decoder (or encoder) blocks: the outermost ``nn.ModuleList`` of repeated blocks holding most parameters.

    ``path`` names them explicitly (the ``--blocks`` option) when structure is ambiguous.
    """
    if path:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise PrunekitError(f"{type(model).__name__} has no module '{path}' (given as the blocks)") from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise PrunekitError(f"'{path}' in {type(model).__name__} is not a non-empty list of blocks "
                                f"(it is a {type(blocks).__name__})")
        return BlockList(path, blocks)
    layers, _ = config_value(text_config(model), CONFIG_LAYERS)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    inside: list[str] = []  # lists nested in a candidate's blocks (experts, sub-layers) are not blocks
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if not all(isinstance(child, nn.Module) and any(True for _ in child.parameters()) for child in module):
            continue
        inside.append(name)
        classes = {type(child).__name__ for child in module}
        named_block = bool(classes & no_split)
        candidates.append(((isinstance(layers, int) and len(module) == layers, named_block, parameter_count(module)),
                           name, module))
    if not candidates:
        raise PrunekitError(f"could not find the blocks of {type(model).__name__}: it has no list of repeated "
                            "layers; name them with --blocks (e.g. --blocks model.layers)")
    candidates.sort(key=lambda item: item[0], reverse=True)
    _, name, module = candidates[0]
    return BlockList(name, module)


def module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def find_final_norm(model: nn.Module, blocks_path: str) -> str | None:
    """The normalisation applied after the last block: a norm the blocks' parent registers after them.

    Families name it differently (``norm``, ``ln_f``, ``final_layer_norm``, ``embedding_norm``); what they
    share is where it sits. Post-norm encoders have none.
    """
    parent_path, _, list_name = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    names = list(parent._modules)
    after = names[names.index(list_name) + 1:] if list_name in names else names
    norms = [name for name in after if is_norm(parent._modules[name])]
    preferred = [name for name in norms if name in FINAL_NORM_NAMES]
    if not preferred:
        # Some families register it before the blocks (OPT's final_layer_norm); only its name tells then.
        preferred = [name for name in names if name in FINAL_NORM_NAMES and is_norm(parent._modules[name])]
    chosen = (preferred or norms or [None])[-1]
    if chosen is None:
        return None
    return f"{parent_path}.{chosen}" if parent_path else chosen


def is_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


def _descendant(module: nn.Module, names: Iterable[str], linear: bool = True) -> tuple[str, nn.Module] | None:
    """The first descendant whose leaf name is in ``names`` (in that order of preference)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for path, child in module.named_modules():
        leaf = path.rpartition(".")[2]
        if leaf in names and leaf not in found and (not linear or is_linear_like(child)):
            found[leaf] = (path, child)
    for name in names:
        if name in found:
            return found[name]
    return None


def find_part(block: nn.Module, hints: Iterable[str], class_hints: Iterable[str]) -> tuple[str, nn.Module] | None:
    """A direct child of the block that is its attention (or MLP): by name, else by class name.

    Only children holding linear layers count, so ``attention_norm`` or ``mlp_norm`` never pass for one.
    """
    hints, class_hints = tuple(hints), tuple(class_hints)
    children = [(name, child) for name, child in block.named_children()
                if any(is_linear_like(m) for m in child.modules()) or _has_3d_weights(child)]
    for hint in hints:
        for name, child in children:
            if name.lower() == hint:
                return name, child
    for name, child in children:
        if any(name.lower().startswith(hint) for hint in hints):
            return name, child
    for name, child in children:
        if any(hint in type(child).__name__.lower() for hint in class_hints):
            return name, child
    return None


def _has_3d_weights(module: nn.Module) -> bool:
    return any(p.dim() == 3 for p in module.parameters())


@dataclass(frozen=True)
class AttentionParts:
    """Where one block's attention projections are (paths inside the block)."""

    module: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # a fused projection producing queries, keys and values
    o: str | None = None

    @property
    def heads_module(self) -> str:
        """The module holding the projections that produce heads (and the attributes its forward reads)."""
        source = self.q or self.qkv or self.module
        return source.rpartition(".")[0] or self.module


def find_attention(block: nn.Module) -> AttentionParts | None:
    part = find_part(block, ("self_attn", "attn", "attention", "self_attention"), ("attention",))
    if part is None:
        return None
    name, attention = part

    def inside(found: tuple[str, nn.Module] | None) -> str | None:
        return f"{name}.{found[0]}" if found is not None else None

    q, k, v = (inside(_descendant(attention, names)) for names in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES))
    qkv = inside(_descendant(attention, FUSED_QKV_NAMES))
    output = inside(_descendant(attention, OUTPUT_NAMES))
    if output is None:  # BERT keeps its output projection beside the attention (attention.output.dense)
        output = inside(_descendant(attention, ("dense",)))
    if not (q and k and v) and not qkv:
        return AttentionParts(name)
    return AttentionParts(name, q if not qkv else None, k if not qkv else None, v if not qkv else None, qkv, output)


@dataclass(frozen=True)
class MLPParts:
    module: str
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    gate_up: str | None = None  # a fused gate and up projection


def find_mlp(block: nn.Module) -> MLPParts | None:
    """The block's dense MLP; None for a mixture of experts (whose widths are the experts')."""
    part = find_part(block, MLP_HINTS, ("mlp", "feedforward", "ffn"))
    if part is not None:
        name, mlp = part
        if any("expert" in path.lower() for path, _ in mlp.named_modules()):
            return None

        def inside(found):
            return f"{name}.{found[0]}" if found is not None else None

        gate_up = inside(_descendant(mlp, FUSED_GATE_UP_NAMES))
        return MLPParts(name, inside(_descendant(mlp, GATE_NAMES)), inside(_descendant(mlp, UP_NAMES)),
                        inside(_descendant(mlp, DOWN_NAMES)), gate_up)
    # OPT, BioGPT, XGLM keep fc1/fc2 directly in the block; BERT splits them into intermediate/output.
    up = _descendant(block, ("fc1", "intermediate.dense"))
    if up is None:
        up = next(((p, m) for p, m in block.named_modules() if p == "intermediate.dense"), None)
    down = _descendant(block, ("fc2",))
    if down is None:
        down = next(((p, m) for p, m in block.named_modules() if p == "output.dense"), None)
    if up is None or down is None:
        return None
    return MLPParts("", None, up[0], down[0])


@dataclass
class ExpertsParts:
    """A mixture of experts inside a block.

    ``fused``: the experts' weights are 3-D tensors (expert, rows, columns) of ``module`` (transformers 5);
    otherwise ``module`` is an ``nn.ModuleList`` of expert MLPs. ``container`` is the module that routes
    tokens to them (the sparse MoE block): calibration pauses there, since batches reach different experts.
    """

    container: str
    module: str
    fused: bool
    tensors: list[str] = field(default_factory=list)  # fused: the 3-D parameters, in call order
    transposed: bool = False  # fused weights stored (expert, in, out)
    routers: list[str] = field(default_factory=list)  # linear layers that route (never pruned by default)


def find_experts(block: nn.Module) -> list[ExpertsParts]:
    found: list[ExpertsParts] = []
    for path, module in block.named_modules():
        three_d = [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3]
        container = path.rpartition(".")[0]
        if three_d and ("expert" in path.rpartition(".")[2].lower() or "expert" in type(module).__name__.lower()):
            order = [name for name in ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "down_proj", "w2")
                     if name in three_d]
            order += [name for name in three_d if name not in order]
            found.append(ExpertsParts(container, path, True, order, bool(getattr(module, "is_transposed", False))))
        elif isinstance(module, nn.ModuleList) and "expert" in path.rpartition(".")[2].lower() and len(module) > 1:
            found.append(ExpertsParts(container, path, False))
    for experts in found:
        parent = block.get_submodule(experts.container) if experts.container else block
        count = len(block.get_submodule(experts.module)) if not experts.fused else \
            getattr(block.get_submodule(experts.module), experts.tensors[0]).shape[0]
        for name, child in parent.named_children():
            if f"{experts.container}.{name}".lstrip(".") == experts.module:
                continue
            # A router scores every expert (or gates a shared expert with one output).
            if is_linear_like(child) and linear_shape(child)[0] in (count, 1):
                experts.routers.append(f"{experts.container}.{name}".lstrip("."))
            elif "router" in name.lower() or "gate" == name.lower():
                weight = getattr(child, "weight", None)
                if isinstance(weight, torch.Tensor):
                    experts.routers.append(f"{experts.container}.{name}".lstrip("."))
    return found

"""Follow one real forward pass and record which channels of which tensors are coupled.

Every tensor produced during the pass carries a *label tensor* of its own shape: element ``i``
holds the id of the channel it belongs to, or -1 when it carries no channel (positions, masks,
constants). Ids name one index along one dimension of a parameter or buffer (the rows of a
Linear weight, the channels of a BatchNorm) or, for a parameter used elementwise (a position
embedding, a class token), one element of it. Id 0 is *pinned*: the model's inputs and outputs.

Each operation maps its inputs' labels to its outputs' labels and records *couplings*: pairs of
ids that must be removed together. Pure data movement (view, permute, cat, split, indexing,
repeat) is followed by applying the very same operation to the label tensors, so any reshape
the model does is followed exactly. Elementwise operations couple the ids that meet at the same
element after broadcasting (a residual add, a gate, a norm's weight). Linear layers and
convolutions couple the input channels with their weight's columns and label their outputs
with their weight's rows. Contractions between activations (attention scores) couple the ids
meeting on the contracted index. An operation not in the table that sees labelled inputs stops
the trace with an error naming it and the module that called it: prunekit never guesses.

Connected components of the coupling graph are the groups of ``prunekit.structure.graph``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.errors import PrunekitError
from prunekit.models.layout import is_linear_like

NO_LABEL = -1
PINNED = 0
_LABEL_ATTR = "_prunekit_labels"
_WEIGHT_VIEW_ATTR = "_prunekit_transposed_weight"  # set on ``W.T`` taken by the linear layer owning W
_TRANSPOSES = {"get:T", "t", "get:mT"}


@dataclass(frozen=True)
class Space:
    """A contiguous range of ids naming the indices of one tensor dimension (or its elements)."""

    start: int
    size: int
    tensor: str
    dim: int | None  # None: one id per element of the tensor
    shape: tuple[int, ...]
    is_buffer: bool = False


@dataclass
class WeightCall:
    """A parameter applied as a Linear/Conv/Embedding weight: where, how often, and how."""

    weight: str
    module: str
    kind: str  # "linear", "conv", "embedding"
    positions: int  # output positions per call (tokens, or batch × spatial)
    groups: int = 1
    channel_dim: int = -1  # the input dimension holding channels (-1 linear, 1 conv)
    input_dim: int = 1  # the weight dimension that reads the input channels (0 for a Conv1D stored (in, out))


@dataclass
class Trace:
    num_ids: int
    spaces: list[Space]
    pairs: np.ndarray  # (n, 2) coupled ids
    split_ids: np.ndarray  # ids whose channels were reshaped into several dimensions (heads)
    mixing_ids: np.ndarray  # ids that took part in a statistic over channels (LayerNorm, mean)
    calls: list[WeightCall]
    grouped_convs: dict[str, int]  # weight -> groups
    group_norms: dict[str, int]  # weight or bias -> groups
    elementwise_tensors: set[str]
    module_types: dict[str, str] = field(default_factory=dict)
    frozen_ops: list[str] = field(default_factory=list)  # unknown operations passed with strict=False
    sealed: list[str] = field(default_factory=list)  # modules run as black boxes (their inputs and outputs pinned)


class TraceError(PrunekitError):
    pass


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "get:" + str(getattr(owner, "__name__", "?"))
    return name


def _flatten(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


# Operations grouped by how labels flow through them.
_UNARY = {
    "abs", "neg", "__neg__", "positive", "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "exp_", "log", "log1p", "expm1", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "erf",
    "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "softplus", "softsign", "mish", "logsigmoid", "prelu_scalar", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "contiguous", "clone", "detach", "detach_", "requires_grad_", "clamp", "clamp_", "clip", "clip_", "clamp_min",
    "clamp_max", "nan_to_num", "square", "sign", "round", "floor", "ceil", "trunc", "frac", "logical_not",
    "isfinite", "isnan", "isinf", "masked_fill", "masked_fill_", "fill_", "zero_", "tril", "triu", "pow_scalar",
    "get:data", "cpu", "cuda", "bool", "long", "int", "__abs__", "__invert__", "bitwise_not", "relu6_", "gelu_",
}
_BINARY = {
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "__add__", "__radd__", "__iadd__", "__sub__",
    "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
    "__div__", "__rdiv__", "__idiv__", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "pow", "__pow__",
    "__rpow__", "pow_", "where", "addcmul", "addcdiv", "lerp", "fmod", "remainder", "eq", "ne", "lt", "le", "gt",
    "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "logical_and", "logical_or", "__and__",
    "__or__", "__xor__", "copysign", "hypot", "atan2", "rsub", "fmax", "fmin", "prelu", "copy_", "xlogy",
    "masked_scatter", "addcmul_", "addcdiv_", "lerp_", "clamp_tensor",
}
_MOVEMENT = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "transpose_",
    "swapaxes", "swapdims", "movedim", "moveaxis", "t", "get:T", "get:mT", "get:H", "get:mH", "unsqueeze",
    "squeeze", "expand", "expand_as", "broadcast_to", "repeat", "repeat_interleave", "tile", "narrow", "select",
    "__getitem__", "index_select", "gather", "take_along_dim", "split", "split_with_sizes", "chunk",
    "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "flip", "roll",
    "unfold", "diagonal", "unsqueeze_", "squeeze_", "masked_select_scalar", "atleast_1d", "atleast_2d",
    "atleast_3d", "ravel",
}
_RESHAPES = {"view", "view_as", "reshape", "reshape_as", "unflatten", "stack", "unfold"}
_REDUCTIONS = {
    "sum": False, "nansum": False, "norm": False, "mean": True, "nanmean": True, "amax": True, "amin": True,
    "max": True, "min": True, "var": True, "std": True, "var_mean": True, "std_mean": True, "logsumexp": True,
    "prod": True, "all": True, "any": True, "argmax": True, "argmin": True, "count_nonzero": True,
    "median": True, "nanmedian": True, "mode": True, "aminmax": True,
}  # name -> whether a statistic over removed (zeroed) channels would change (mean, max, ...), unlike a sum
_ALONG_DIM = {"softmax": True, "log_softmax": True, "cumsum": False, "cumprod": True, "normalize": True,
              "logcumsumexp": True, "sort": True, "topk": True, "argsort": True}
_POOLING = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "fractional_max_pool2d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices",
}
_CONSTANT_MAKERS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
                    "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "size", "dim", "numel",
                    "get:shape", "get:dtype", "get:device", "get:requires_grad", "get:grad", "get:is_cuda",
                    "nonzero", "get:ndim", "get:is_leaf", "get:grad_fn", "stride", "data_ptr", "element_size",
                    "storage_offset", "is_contiguous", "is_floating_point", "item", "tolist", "__len__",
                    "__bool__", "__index__", "__int__", "__float__", "__format__", "__repr__", "__hash__",
                    "get:layout", "get:names", "get:is_sparse", "get:is_quantized", "get:is_meta", "__iter__",
                    "numpy", "bincount", "arange", "zeros", "ones", "full", "empty", "tensor", "randn", "rand"}


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module, strict: bool = True, sealed: Iterable[str] = (),
                 pinned: Iterable[str] = ()):
        super().__init__()
        self.model = model
        self.strict = strict
        self.sealed = set(sealed)
        self.pinned = set(pinned)
        self.sealed_depth = 0  # > 0 while a sealed module runs: its operations are not followed
        self.tensor_names: dict[int, tuple[str, torch.Tensor, bool]] = {}
        for name, param in model.named_parameters():
            self.tensor_names[id(param)] = (name, param, False)
        for name, buffer in model.named_buffers():
            self.tensor_names.setdefault(id(buffer), (name, buffer, True))
        self.next_id = 1
        self.spaces: list[Space] = []
        self._dim_spaces: dict[tuple[str, int], torch.Tensor] = {}
        self._element_spaces: dict[str, torch.Tensor] = {}
        self.pairs: list[np.ndarray] = []
        self.split: list[np.ndarray] = []
        self.mixing: list[np.ndarray] = []
        self.calls: list[WeightCall] = []
        self.grouped_convs: dict[str, int] = {}
        self.group_norms: dict[str, int] = {}
        self.module_stack: list[str] = []
        self.frozen_ops: list[str] = []

    # ---- ids and labels ------------------------------------------------------------------

    def _new_space(self, tensor: str, dim: int | None, shape: tuple[int, ...], is_buffer: bool) -> torch.Tensor:
        count = shape[dim] if dim is not None else math.prod(shape)
        ids = torch.arange(self.next_id, self.next_id + count, dtype=torch.long)
        self.spaces.append(Space(self.next_id, count, tensor, dim, tuple(shape), is_buffer))
        self.next_id += count
        return ids

    def named(self, tensor: Any) -> tuple[str, torch.Tensor, bool] | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        info = self.tensor_names.get(id(tensor))
        if info is not None and info[1] is tensor:
            return info
        return None

    def dim_space(self, tensor: torch.Tensor, dim: int, role: str) -> torch.Tensor:
        info = self.named(tensor)
        if info is None:
            labels = self.labels(tensor)
            if bool((labels >= 0).any()):
                raise TraceError(f"the {role} used {self._where()} is computed from other tensors (a parametrization "
                                 "or mask?); squash masks and parametrizations before structural pruning")
            return torch.full((tensor.shape[dim],), NO_LABEL, dtype=torch.long)
        name, real, is_buffer = info
        dim = dim % real.dim()
        key = (name, dim)
        if key not in self._dim_spaces:
            self._dim_spaces[key] = self._new_space(name, dim, tuple(real.shape), is_buffer)
        return self._dim_spaces[key]

    def labels(self, tensor: torch.Tensor) -> torch.Tensor:
        info = self.named(tensor)
        if info is not None:
            name, real, is_buffer = info
            if is_buffer or not real.is_floating_point():
                # Buffers are constants (rotary frequencies, position ids) unless a known rule slices them.
                return torch.full(real.shape, NO_LABEL, dtype=torch.long)
            if real.dim() == 0:
                return torch.full((), NO_LABEL, dtype=torch.long)
            if real.dim() == 1:
                return self.dim_space(real, 0, "parameter")
            if name not in self._element_spaces:
                self._element_spaces[name] = self._new_space(name, None, tuple(real.shape), False).view(real.shape)
            return self._element_spaces[name]
        labels = getattr(tensor, _LABEL_ATTR, None)
        if labels is None or labels.shape != tensor.shape:
            return torch.full(tensor.shape, NO_LABEL, dtype=torch.long)
        return labels

    def set_labels(self, tensor: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or self.named(tensor) is not None:
            return
        if labels.shape != tensor.shape:
            labels = labels.expand(tensor.shape) if labels.dim() <= tensor.dim() else labels.reshape(tensor.shape)
        setattr(tensor, _LABEL_ATTR, labels)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        # Activations repeat their labels over batch and positions: drop dimensions along which
        # neither side varies before looking for pairs (a conv map shrinks to one entry per channel).
        for dim in range(a.dim()):
            if a.shape[dim] > 1 and not _varies_along(a, dim) and not _varies_along(b, dim):
                a, b = a.narrow(dim, 0, 1), b.narrow(dim, 0, 1)
        both = (a >= 0) & (b >= 0) & (a != b)
        if not bool(both.any()):
            return
        keys = torch.unique((a[both] << 32) | b[both])  # ids stay below 2**31: one int64 per pair
        self.pairs.append(torch.stack([keys >> 32, keys & 0xFFFFFFFF], dim=1).numpy())

    def merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Couple two label tensors elementwise (after broadcasting) and return the merged labels."""
        self.union(a, b)
        a, b = torch.broadcast_tensors(a, b)
        return torch.where(a >= 0, a, b)

    def mark(self, store: list[np.ndarray], labels: torch.Tensor) -> None:
        ids = torch.unique(labels[labels >= 0])
        if ids.numel():
            store.append(ids.numpy())

    def _where(self) -> str:
        if not self.module_stack:
            return "in the model's own forward"
        name = self.module_stack[-1]
        module = self.model.get_submodule(name) if name else self.model
        return f"in module '{name or '<root>'}' ({type(module).__name__})"

    def _labelled(self, tensors: Iterable[torch.Tensor]) -> bool:
        for tensor in tensors:
            info = self.named(tensor)
            if info is not None:
                if not info[2] and info[1].is_floating_point():
                    return True
                continue
            labels = getattr(tensor, _LABEL_ATTR, None)
            if labels is not None and labels.shape == tensor.shape and bool((labels >= 0).any()):
                return True
        return False

    # ---- dispatch ------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.sealed_depth:
            return out
        outputs = _flatten(out)
        if not outputs:
            return out
        name = _func_name(func)
        inputs = _flatten(args) + _flatten(kwargs)
        if name in _TRANSPOSES and isinstance(out, torch.Tensor) and self._own_weight(args[0] if args else None):
            # A linear layer transposing its own weight for a hand-written product (Falcon's ``x @ W.T``).
            setattr(out, _WEIGHT_VIEW_ATTR, args[0])
            return out
        if name in _CONSTANT_MAKERS or not self._labelled(inputs):
            for tensor in outputs:
                if tensor is not None and self.named(tensor) is None:
                    self.set_labels(tensor, torch.full(tensor.shape, NO_LABEL, dtype=torch.long))
            return out
        handler = self._handler(name)
        if handler is None:
            if self.strict:
                raise TraceError(f"cannot follow channels through the operation '{name}' {self._where()}; "
                                 "structural pruning needs every operation on channel data to be known "
                                 "(strict=False in build_graph/prune_structure, or --lenient on the command line, "
                                 "leaves the channels it touches unpruned)")
            self.frozen_ops.append(f"'{name}' {self._where()}")
            for tensor in inputs:
                self.union(self.labels(tensor), torch.tensor(PINNED))
            for tensor in outputs:
                self.set_labels(tensor, torch.full(tensor.shape, PINNED, dtype=torch.long))
            return out
        handler(name, func, args, kwargs, out)
        return out

    def _handler(self, name: str):
        if name in _UNARY:
            return self._unary
        if name in _BINARY:
            return self._binary
        if name in _MOVEMENT:
            return self._movement
        if name in _REDUCTIONS:
            return self._reduction
        if name in _ALONG_DIM:
            return self._along_dim
        if name in _POOLING:
            return self._pooling
        return {
            "linear": self._linear, "conv1d": self._conv, "conv2d": self._conv, "conv3d": self._conv,
            "embedding": self._embedding, "layer_norm": self._layer_norm, "rms_norm": self._layer_norm,
            "batch_norm": self._batch_norm, "instance_norm": self._batch_norm, "group_norm": self._group_norm,
            "matmul": self._matmul, "__matmul__": self._matmul, "__rmatmul__": self._rmatmul, "bmm": self._matmul,
            "mm": self._matmul, "baddbmm": self._addmm, "addmm": self._addmm,
            "scaled_dot_product_attention": self._sdpa, "__setitem__": self._setitem, "pad": self._pad,
        }.get(name)

    # ---- rules ---------------------------------------------------------------------------

    def _unary(self, name, func, args, kwargs, out):
        source = args[0] if args else kwargs.get("input")
        labels = self.labels(source)
        for tensor in _flatten(out):
            if tensor.shape == labels.shape:
                self.set_labels(tensor, labels)
            else:
                raise TraceError(f"'{name}' changed the shape of its input {self._where()}")

    def _binary(self, name, func, args, kwargs, out):
        tensors = [t for t in _flatten(args) + _flatten(kwargs) if isinstance(t, torch.Tensor)]
        result = out if isinstance(out, torch.Tensor) else _flatten(out)[0]
        merged = torch.full(result.shape, NO_LABEL, dtype=torch.long)
        for tensor in tensors:
            labels = self.labels(tensor)
            try:
                labels = torch.broadcast_to(labels, result.shape)
            except RuntimeError:
                raise TraceError(f"'{name}' combines tensors of shapes that do not broadcast to its output "
                                 f"{self._where()}") from None
            merged = self.merge(merged, labels)
        self.set_labels(result, merged.clone())

    def _substitute(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or self._labelled([value]):
                return self.labels(value)
            return value
        if isinstance(value, (list, tuple)):
            converted = [self._substitute(v) for v in value]
            return type(value)(converted) if isinstance(value, list) else tuple(converted)
        return value

    def _movement(self, name, func, args, kwargs, out):
        label_args = [self._substitute(a) for a in args]
        label_kwargs = {k: self._substitute(v) for k, v in kwargs.items()}
        try:
            try:
                moved = func(*label_args, **label_kwargs)
            except RuntimeError:
                if name != "view":
                    raise
                # Label tensors are laid out differently from the data (broadcast, moved), and ``view`` needs
                # compatible strides; a view never reorders elements, so reshaping the labels is the same map.
                moved = torch.Tensor.reshape(*label_args, **label_kwargs)
        except Exception as exc:  # the op rejected integer label tensors
            raise TraceError(f"cannot follow channels through '{name}' {self._where()}: {exc}") from None
        outputs, moved_list = _flatten(out), _flatten(moved)
        if len(outputs) != len(moved_list):
            raise TraceError(f"'{name}' {self._where()} returned an unexpected structure")
        source = _flatten(args)[0] if _flatten(args) else None
        for tensor, labels in zip(outputs, moved_list):
            if labels.shape != tensor.shape:
                raise TraceError(f"cannot follow channels through '{name}' {self._where()}")
            if name in _RESHAPES and source is not None:
                self._check_split(self.labels(source), labels)
            self.set_labels(tensor, labels.clone() if labels.data_ptr() == getattr(source, "data_ptr", lambda: -1)() else labels)

    def _check_split(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """A channel dimension reshaped into several dimensions (heads × head_dim) fixes the sizes it
        was split into: its channels can only go as whole slices, and only with a rule that knows
        the module's size attributes (a head handler)."""
        if _varying_dims(after) > max(_varying_dims(before), 1):
            self.mark(self.split, after)

    def _reduction(self, name, func, args, kwargs, out):
        source = args[0] if args else kwargs["input"]
        labels = self.labels(source)
        dims = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self._binary(name, func, args, kwargs, out)
        if name == "norm":
            dims = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keepdim = kwargs.get("keepdim", False)
        if name not in ("norm",) and len(args) > 2 and isinstance(args[2], bool):
            keepdim = args[2]
        if dims is None:
            dims = tuple(range(labels.dim()))
        elif isinstance(dims, int):
            dims = (dims,)
        dims = tuple(sorted({d % max(labels.dim(), 1) for d in dims})) if labels.dim() else ()
        reduced, constant = _reduce_labels(labels, dims, keepdim)
        if _REDUCTIONS[name] and not bool(constant.all()) and _mixes_channels(labels, dims):
            self.mark(self.mixing, labels)
        for tensor in _flatten(out):
            if tensor.shape == reduced.shape:
                self.set_labels(tensor, reduced)
            else:
                self.set_labels(tensor, torch.full(tensor.shape, NO_LABEL, dtype=torch.long))

    def _along_dim(self, name, func, args, kwargs, out):
        source = args[0] if args else kwargs["input"]
        labels = self.labels(source)
        dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
        if dim is None:
            dim = -1
        if labels.dim() and _ALONG_DIM[name] and _mixes_channels(labels, (dim % labels.dim(),)):
            self.mark(self.mixing, labels)
        for tensor in _flatten(out):
            self.set_labels(tensor, labels if tensor.shape == labels.shape
                            else torch.full(tensor.shape, NO_LABEL, dtype=torch.long))

    def _pooling(self, name, func, args, kwargs, out):
        source = args[0] if args else kwargs["input"]
        labels = self.labels(source)
        if labels.dim() < 3:
            raise TraceError(f"'{name}' on a tensor without spatial dimensions {self._where()}")
        flat = labels.flatten(2)
        if not bool((flat == flat[:, :, :1]).all()):
            raise TraceError(f"'{name}' {self._where()} pools over positions that belong to different channels")
        per_channel = flat[:, :, 0]
        for tensor in _flatten(out):
            if tensor.dim() == labels.dim() and tensor.shape[:2] == labels.shape[:2]:
                self.set_labels(tensor, per_channel.reshape(*per_channel.shape, *([1] * (tensor.dim() - 2)))
                                .expand(tensor.shape).clone())
            else:
                raise TraceError(f"'{name}' {self._where()} changed the batch or channel dimension")

    def _pad(self, name, func, args, kwargs, out):
        source = args[0] if args else kwargs["input"]
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        labels = self.labels(source)
        if mode == "constant":
            padded = F.pad(labels, pad, mode="constant", value=NO_LABEL)
        else:
            padded = F.pad(labels.double().unsqueeze(0) if labels.dim() < 3 else labels.double(), pad, mode=mode)
            padded = padded.reshape(out.shape).round().long()
        self.set_labels(out, padded)

    def _setitem(self, name, func, args, kwargs, out):
        target, index, value = args[0], args[1], args[2]
        labels = self.labels(target).clone()
        value_labels = self.labels(value) if isinstance(value, torch.Tensor) else torch.tensor(NO_LABEL)
        labels[self._substitute(index) if isinstance(index, tuple) else index] = value_labels
        self.set_labels(target, labels)

    def _record_call(self, weight: torch.Tensor, kind: str, output: torch.Tensor, channels: int, groups: int = 1,
                     channel_dim: int = -1, input_dim: int = 1) -> None:
        info = self.named(weight)
        if info is None:
            return
        positions = output.numel() // max(channels, 1)
        self.calls.append(WeightCall(info[0], self.module_stack[-1] if self.module_stack else "", kind, positions,
                                     groups, channel_dim, input_dim))

    def _linear(self, name, func, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if self.named(weight) is None and self._labelled([weight]):
            raise TraceError(f"a Linear {self._where()} uses a weight computed from labelled tensors")
        rows = self.dim_space(weight, 0, "Linear weight")
        cols = self.dim_space(weight, 1, "Linear weight")
        self._couple_features(self.labels(x), cols, -1)
        if bias is not None:
            self.union(self.dim_space(bias, 0, "Linear bias"), rows)
        self.set_labels(out, rows.expand(out.shape).clone())
        self._record_call(weight, "linear", out, weight.shape[0])

    def _couple_features(self, labels: torch.Tensor, columns: torch.Tensor, dim: int) -> None:
        """Couple channel ``j`` of an input (at every position) with column ``j`` of a weight."""
        moved = labels.movedim(dim, -1).reshape(-1, labels.shape[dim])
        if not _varies_along(moved, 0):
            moved = moved[:1]
        self.union(moved, columns.unsqueeze(0))

    def _conv(self, name, func, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        labels = self.labels(x)
        channel_dim = 1 if labels.dim() == weight.dim() else 0
        rows = self.dim_space(weight, 0, "convolution weight")
        if groups == 1:
            self._couple_features(labels, self.dim_space(weight, 1, "convolution weight"), channel_dim)
        else:
            # Grouped and depthwise convolutions: a group's input channels and output channels go together,
            # and whole groups are removed (the per-group sizes stay, the number of groups shrinks).
            in_per, out_per = weight.shape[1], weight.shape[0] // groups
            per_channel = labels.movedim(channel_dim, 0).reshape(labels.shape[channel_dim], -1)
            first_row = rows[(torch.arange(rows.numel()) // out_per) * out_per]
            self.union(rows, first_row)
            self.union(per_channel, rows[(torch.arange(per_channel.shape[0]) // in_per) * out_per].unsqueeze(1))
            self.grouped_convs[self.named(weight)[0]] = groups
        if bias is not None:
            self.union(self.dim_space(bias, 0, "convolution bias"), rows)
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        self.set_labels(out, rows.reshape(shape).expand(out.shape).clone())
        self._record_call(weight, "conv", out, weight.shape[0], groups, channel_dim)

    def _embedding(self, name, func, args, kwargs, out):
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        columns = self.dim_space(weight, 1, "embedding")
        self.set_labels(out, columns.expand(out.shape).clone())
        self._record_call(weight, "embedding", out, weight.shape[1])

    def _layer_norm(self, name, func, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        labels = self.labels(x)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise TraceError(f"'{name}' over {len(shape)} dimensions {self._where()} is not supported")
        for param in (weight, bias):
            if param is not None:
                labels = self.merge(labels, self.dim_space(param, 0, "norm parameter"))
        self.mark(self.mixing, labels)  # the mean and variance run over every channel
        self.set_labels(out, labels.clone())

    def _batch_norm(self, name, func, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        labels = self.labels(x)
        names = ("running_mean", "running_var", "weight", "bias")
        params = [kwargs.get(n, args[i + 1] if len(args) > i + 1 else None) for i, n in enumerate(names)]
        shape = [1] * labels.dim()
        shape[1] = -1
        for param in params:
            if isinstance(param, torch.Tensor):
                labels = self.merge(labels, self.dim_space(param, 0, "norm parameter").reshape(shape))
        self.set_labels(out, labels.clone())

    def _group_norm(self, name, func, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        groups = args[1] if len(args) > 1 else kwargs["num_groups"]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        labels = self.labels(x)
        channels = labels.shape[1]
        per_group = channels // groups
        shape = [1] * labels.dim()
        shape[1] = -1
        for param in (weight, bias):
            if param is not None:
                labels = self.merge(labels, self.dim_space(param, 0, "norm parameter").reshape(shape))
                self.group_norms[self.named(param)[0]] = groups
        # Statistics run over whole groups: a group's channels are removed together, which is exact.
        per_channel = labels.movedim(1, 0).reshape(channels, -1)
        self.union(per_channel, per_channel[(torch.arange(channels) // per_group) * per_group, :1])
        self.set_labels(out, labels.clone())

    def _contract(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Labels of ``a @ b`` (batched), coupling the ids that meet on the contracted index."""
        squeeze_a, squeeze_b = a.dim() == 1, b.dim() == 1
        if squeeze_a:
            a = a.unsqueeze(0)
        if squeeze_b:
            b = b.unsqueeze(-1)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a = a.expand(*batch, *a.shape[-2:])
        b = b.expand(*batch, *b.shape[-2:])
        a_rows = _constant_along(a, -1)  # (..., n) label of row i if constant along the contraction
        b_cols = _constant_along(b, -2)  # (..., m)
        # Couple the ids meeting on the contracted index, separately for every batch index (a head
        # only meets its own keys); rows that repeat the same labels are taken once.
        if bool((a >= 0).any()) and bool((b >= 0).any()):
            flat_a = a.reshape(-1, *a.shape[-2:])
            flat_b = b.transpose(-1, -2).reshape(-1, b.shape[-1], b.shape[-2])
            if not _varies_along(flat_a, 1):
                flat_a = flat_a[:, :1]
            if not _varies_along(flat_b, 1):
                flat_b = flat_b[:, :1]
            self.union(flat_a.unsqueeze(2), flat_b.unsqueeze(1))
        rows = a_rows.unsqueeze(-1).expand(*a_rows.shape, b.shape[-1])
        cols = b_cols.unsqueeze(-2).expand(*b_cols.shape[:-1], a.shape[-2], b.shape[-1])
        labels = self.merge(rows, cols)
        if squeeze_a:
            labels = labels.squeeze(-2)
        if squeeze_b:
            labels = labels.squeeze(-1)
        return labels

    def _own_weight(self, tensor: Any) -> bool:
        """``tensor`` is the weight of the linear-like module running now (a Linear subclass or transformers'
        ``Conv1D``), which may compute its product by hand instead of calling ``F.linear``."""
        if not isinstance(tensor, torch.Tensor) or not self.module_stack or tensor.dim() != 2:
            return False
        module = self.model.get_submodule(self.module_stack[-1]) if self.module_stack[-1] else self.model
        return is_linear_like(module) and module.weight is tensor

    def _product_weight(self, tensor: Any) -> tuple[torch.Tensor, int] | None:
        """(weight, the dimension reading the input) when ``tensor`` is a linear-like module's own weight used as
        the right operand of a product: ``x @ W`` (Conv1D, stored (in, out)) or ``x @ W.T`` (stored (out, in))."""
        if self._own_weight(tensor):
            return tensor, 0
        source = getattr(tensor, _WEIGHT_VIEW_ATTR, None) if isinstance(tensor, torch.Tensor) else None
        if source is not None and self._own_weight(source):
            return source, 1
        return None

    def _check_raw_matrix(self, tensor: torch.Tensor) -> None:
        info = self.named(tensor)
        if info is not None and not info[2] and tensor.dim() >= 2:
            raise TraceError(f"a matrix product with the raw parameter '{info[0]}' {self._where()} is not "
                             "supported; use nn.Linear")

    def _weight_product(self, x: torch.Tensor, weight: torch.Tensor, input_dim: int, bias: torch.Tensor | None,
                        out: torch.Tensor) -> None:
        """A linear layer written as a product: the input's channels meet the weight's ``input_dim``."""
        rows = self.dim_space(weight, 1 - input_dim, "Linear weight")
        cols = self.dim_space(weight, input_dim, "Linear weight")
        self._couple_features(self.labels(x), cols, -1)
        if bias is not None:
            self.union(self.dim_space(bias, 0, "Linear bias"), rows)
        self.set_labels(out, rows.expand(out.shape).clone())
        self._record_call(weight, "linear", out, rows.numel(), input_dim=input_dim)

    def _matmul(self, name, func, args, kwargs, out):
        a, b = (args + tuple(kwargs.values()))[:2]
        product = self._product_weight(b)
        if product is not None:
            return self._weight_product(a, product[0], product[1], None, out)
        self._check_raw_matrix(a)
        self._check_raw_matrix(b)
        self.set_labels(out, self._contract(self.labels(a), self.labels(b)).clone())

    def _rmatmul(self, name, func, args, kwargs, out):
        self._matmul(name, func, (args[1], args[0]), kwargs, out)

    def _addmm(self, name, func, args, kwargs, out):
        # addmm(input, mat1, mat2) and baddbmm(input, batch1, batch2), positional or by keyword (BLOOM's ALiBi)
        names = ("input", "mat1", "mat2") if name == "addmm" else ("input", "batch1", "batch2")
        bias, a, b = (args[i] if len(args) > i else kwargs[key] for i, key in enumerate(names))
        product = self._product_weight(b)
        if product is not None:
            return self._weight_product(a, product[0], product[1], bias, out)
        self._check_raw_matrix(a)
        self._check_raw_matrix(b)
        labels = self._contract(self.labels(a), self.labels(b))
        self.set_labels(out, self.merge(labels, torch.broadcast_to(self.labels(bias), labels.shape)).clone())

    def _sdpa(self, name, func, args, kwargs, out):
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
        q_labels, k_labels, v_labels = self.labels(q), self.labels(k), self.labels(v)
        heads = q_labels.shape[-3] if q_labels.dim() >= 3 else 1
        if q_labels.dim() >= 3 and k_labels.shape[-3] != heads:
            repeats = heads // k_labels.shape[-3]
            k_labels = k_labels.repeat_interleave(repeats, dim=-3)
            v_labels = v_labels.repeat_interleave(repeats, dim=-3)
        self._contract(q_labels, k_labels.transpose(-1, -2))
        # softmax(q kᵀ) carries no channel; the output's channels are the values'.
        values = _constant_along(v_labels, -2)
        self.set_labels(out, values.unsqueeze(-2).expand(out.shape).clone())

    # ---- module stack --------------------------------------------------------------------

    def attach(self) -> list:
        handles = []
        for name, module in self.model.named_modules():
            def push(_module, _args, name=name):
                self.module_stack.append(name)

            def pop(_module, _args, output, name=name):
                if self.module_stack and self.module_stack[-1] == name:
                    self.module_stack.pop()
                if name in self.pinned:
                    for tensor in _flatten(output):
                        self.union(self.labels(tensor), torch.tensor(PINNED))

            if name in self.sealed:
                handles += self._seal(module, name)
                continue
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop, always_call=True))
        return handles

    def _seal(self, module: nn.Module, name: str) -> list:
        """Run ``module`` as a black box: its channels are not followed, so whatever enters or leaves it is pinned
        and its own tensors never join a family (they stay whole)."""
        def enter(_module, args, kwargs):
            self.module_stack.append(name)
            for tensor in _flatten(args) + _flatten(kwargs):
                self.union(self.labels(tensor), torch.tensor(PINNED))
            self.sealed_depth += 1

        def leave(_module, _args, _kwargs, output):
            self.sealed_depth -= 1
            if self.module_stack and self.module_stack[-1] == name:
                self.module_stack.pop()
            for tensor in _flatten(output):
                self.set_labels(tensor, torch.full(tensor.shape, PINNED, dtype=torch.long))

        return [module.register_forward_pre_hook(enter, with_kwargs=True),
                module.register_forward_hook(leave, with_kwargs=True, always_call=True)]


def _varying_dims(labels: torch.Tensor) -> int:
    return sum(1 for d in range(labels.dim()) if _varies_along(labels, d))


def _varies_along(labels: torch.Tensor, dim: int) -> bool:
    if labels.shape[dim] <= 1:
        return False
    return bool((labels != labels.narrow(dim, 0, 1)).any())


def _mixes_channels(labels: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether some slice over ``dims`` holds two different channels: a statistic over it (a mean, a max, a
    softmax's sum) then makes each channel's values depend on the other's. A slice with one channel among
    unlabelled values (an attention head's sink beside its scores) mixes no channels."""
    rest = [d for d in range(labels.dim()) if d not in dims]
    size = math.prod(labels.shape[d] for d in dims)
    if size <= 1:
        return False
    rows = labels.permute(*rest, *dims).reshape(-1, size)
    valid = rows >= 0
    highest = torch.where(valid, rows, torch.full_like(rows, NO_LABEL)).amax(-1)
    lowest = torch.where(valid, rows, torch.full_like(rows, torch.iinfo(rows.dtype).max)).amin(-1)
    return bool(((highest >= 0) & (lowest != highest)).any())


def _constant_along(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """The label along ``dim`` where it is the same at every index, else -1 (the dim is removed)."""
    first = labels.narrow(dim, 0, 1)
    constant = (labels == first).all(dim=dim, keepdim=True)
    return torch.where(constant, first, torch.full_like(first, NO_LABEL)).squeeze(dim)


def _reduce_labels(labels: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not dims:
        return labels, torch.ones((), dtype=torch.bool)
    rest = [d for d in range(labels.dim()) if d not in dims]
    moved = labels.permute(*rest, *dims).reshape(*[labels.shape[d] for d in rest], -1)
    first = moved[..., :1]
    constant = (moved == first).all(dim=-1)
    reduced = torch.where(constant, first.squeeze(-1), torch.full_like(constant, NO_LABEL, dtype=torch.long))
    if keepdim:
        for d in dims:
            reduced = reduced.unsqueeze(d)
    return reduced, constant


def pin_labels(tracer: _Tracer, tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        tracer.union(tracer.labels(tensor), torch.tensor(PINNED))


def trace(model: nn.Module, example_inputs: tuple | dict, strict: bool = True, sealed: Iterable[str] = (),
          pinned: Iterable[str] = ()) -> Trace:
    """Run ``model`` once on ``example_inputs`` (a tuple of positional arguments or a dict of keyword
    arguments) and record every coupling between channels. ``sealed`` names modules run as black boxes
    (``_Tracer._seal``): parts of a model whose channels structural pruning leaves whole. ``pinned`` names
    modules whose outputs are pinned like the model's own (the routers of experts: one output per expert)."""
    tracer = _Tracer(model, strict=strict, sealed=sealed, pinned=pinned)
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    for tensor in _flatten(args) + _flatten(kwargs):
        if tensor.is_floating_point():
            setattr(tensor, _LABEL_ATTR, torch.full(tensor.shape, PINNED, dtype=torch.long))
    handles = tracer.attach()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            output = model(*args, **kwargs)
        pin_labels(tracer, _flatten(output))
    except TraceError:
        raise
    except PrunekitError:
        raise
    except Exception as exc:
        raise PrunekitError(f"the model does not run on the example input {tracer._where()}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        for handle in handles:
            handle.remove()
        for tensor in _flatten(args) + _flatten(kwargs):
            if hasattr(tensor, _LABEL_ATTR):
                delattr(tensor, _LABEL_ATTR)
        model.train(was_training)
    pairs = np.concatenate(tracer.pairs) if tracer.pairs else np.zeros((0, 2), dtype=np.int64)
    split = np.unique(np.concatenate(tracer.split)) if tracer.split else np.zeros(0, dtype=np.int64)
    mixing = np.unique(np.concatenate(tracer.mixing)) if tracer.mixing else np.zeros(0, dtype=np.int64)
    module_types = {name: type(module).__name__ for name, module in model.named_modules()}
    return Trace(num_ids=tracer.next_id, spaces=tracer.spaces, pairs=pairs, split_ids=split, mixing_ids=mixing,
                 calls=tracer.calls, grouped_convs=tracer.grouped_convs, group_norms=tracer.group_norms,
                 elementwise_tensors=set(tracer._element_spaces), module_types=module_types,
                 frozen_ops=list(dict.fromkeys(tracer.frozen_ops)), sealed=sorted(tracer.sealed))

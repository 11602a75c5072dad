"""SliceGPT (Ashkboos et al., 2024): rotate the residual stream into its principal axes, then delete the
weakest axes from every weight that reads or writes it.

Computational invariance. In a pre-norm block whose norms are RMSNorms, ``RMSNorm(x Q) = RMSNorm(x) Q`` for
any orthogonal ``Q`` once the norm's scale is folded into the linears that read it (``fold_norms``). So the
residual stream may be expressed in any orthonormal basis: the embeddings and every linear writing to the
stream (attention output, MLP down projection) are multiplied by ``Q`` on their output side, every linear
reading it (queries, keys, values, gate, up, the head) by ``Q`` on their input side, and the model computes
the same function.

PCA and slicing. Each place the stream is read gets its own basis: the eigenvectors of the uncentred second
moment ``Σ xᵀx`` (float64) of the stream there on the calibration windows: entering the attention
(``Q_in``: the embeddings for block 0, the previous block's output after), entering the MLP (``Q_mid``) and
leaving the block (``Q_out``). Keeping the first d' axes keeps most of the stream's energy; every linear loses
the rows or columns of the others, the embeddings and head their columns. Since consecutive bases differ, the
residual connection that carries the stream from one to the next becomes a d' × d' matrix,
``Q_in'ᵀ Q_mid'`` around the attention and ``Q_mid'ᵀ Q_out'`` around the MLP (``core.shortcuts``).

Sequential calibration. Blocks are visited in order, each fed the stream as the already-sliced blocks before
it produce it; within a block the MLP's basis is computed on the stream after the sliced attention. Here
this is done on the block's unchanged (folded) weights, with the stream projected onto the kept axes where
the sliced model would drop the others: the projected full-width computation and the sliced one are the same
function, so the block is rotated and sliced once, when its three bases are known.

The norm after slicing. An RMSNorm divides by ``sqrt(mean(x²))``; on the sliced stream the mean is over d'
coordinates, while the full stream's (the same vector, less its weakest axes) was over d. SliceGPT keeps the
full-width normalisation (its ``RMSN`` divides ``Σ x²`` by the original d). Here the family's own norm class
is kept, its weight set to ``sqrt(d / d')`` and its epsilon to ``ε d / d'``, which computes exactly that.

A head tied to the embeddings cannot take the final norm's scale nor the last block's basis while the
embeddings keep theirs. ``head="untie"`` (the default) gives the head its own copy first (d' × vocabulary more
parameters, which the kept width pays for); ``head="tied"`` keeps one table, rotated by the embeddings' basis
``Q_0``, and puts the final norm's scale and the change of basis into one d' × d' map applied to the head's input
(``core.shortcuts.InputMap``): ``logits = RMSN(h') · Q_L'ᵀ diag(γ) Q_0' · (E Q_0')ᵀ``, exact at full width.

The kept width d' is a multiple of ``unit`` chosen so that the parameters removed, shortcuts and an untied
head included, are as close as possible to ``ratio`` of the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from prunekit.core.calibration import SequentialCalibration
from prunekit.core.progress import progress_bar
from prunekit.core.shortcuts import attach_input_map, attach_shortcut, input_maps, residual_shortcuts
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.models.layout import is_norm, text_config
from prunekit.structure.shrink_method import SHRINK_METHODS, ShrinkMethod

PROBE_TOKENS = 8
TIED_HEAD_MAP = "tied_head_map"  # where a tied head's input map lives, under the model's root
EPSILON_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")


@dataclass
class BlockLayout:
    """One pre-norm block, as module paths from the model root."""

    index: int
    path: str
    attention: str  # the attention branch (its output is what the block adds to the residual)
    attention_norm: str
    attention_readers: list[str]  # q, k, v (or the fused qkv)
    attention_writer: str  # o
    mlp: str
    mlp_norm: str
    mlp_readers: list[str]  # gate, up (or the fused gate_up)
    mlp_writer: str  # down


@dataclass
class ResidualLayout:
    """Everything that reads or writes the residual stream, checked to be what SliceGPT can rotate."""

    width: int
    embeddings: str
    head: str
    final_norm: str
    tied: bool  # the head shares the embeddings' table (and keeps sharing it unless untie_head ran)
    blocks: list[BlockLayout] = field(default_factory=list)

    def norms(self) -> list[str]:
        return [n for b in self.blocks for n in (b.attention_norm, b.mlp_norm)] + [self.final_norm]


def _refuse(model: nn.Module, why: str) -> PrunekitError:
    return PrunekitError(f"slicegpt cannot rotate {type(model).__name__}: {why}")


def _linear(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    if type(module) is not nn.Linear:
        raise _refuse(model, f"{path} is a {type(module).__name__}, not a plain nn.Linear")
    return module


def _norm_epsilon(norm: nn.Module) -> float:
    for name in EPSILON_ATTRIBUTES:
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return 1e-6


@torch.no_grad()
def _check_rms_norm(model: nn.Module, path: str) -> None:
    """The norm must compute ``weight · x / rms(x)``: probed on inputs with a large mean, which a LayerNorm would
    subtract, and far from the epsilon."""
    norm = model.get_submodule(path)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise _refuse(model, f"{path} ({type(norm).__name__}) has no per-channel scale to fold")
    if getattr(norm, "bias", None) is not None:
        raise _refuse(model, f"{path} is a LayerNorm with a bias; slicegpt folds RMSNorms only (the mean "
                             "subtraction is not folded)")
    probe = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = (probe * 3 + 5).to(weight.dtype)
    output = norm(probe).double()
    normalised = probe.double() * torch.rsqrt(probe.double().square().mean(-1, keepdim=True) + _norm_epsilon(norm))
    scale = weight.double()
    if torch.allclose(output, normalised * scale, rtol=1e-4, atol=1e-5):
        return
    if torch.allclose(output, normalised * (1 + scale), rtol=1e-4, atol=1e-5):
        raise _refuse(model, f"{path} scales by 1 + weight (Gemma's RMSNorm), which slicegpt does not fold")
    raise _refuse(model, f"{path} ({type(norm).__name__}) is not an RMSNorm (weight · x / rms(x)); LayerNorm's "
                         "mean subtraction is not folded")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def find_residual_layout(model: nn.Module, adapter: ModelAdapter, probe_ids: torch.Tensor) -> ResidualLayout:
    """Where the residual stream is read and written, found from the adapter and confirmed by one forward pass
    on a few tokens: every block must be a sequential pre-norm block (output = input + attention + MLP, each
    branch reading its own RMSNorm of the stream), the blocks must receive the token embeddings (up to a
    constant factor), and the head must read the final norm. Refuses in one line otherwise."""
    if residual_shortcuts(model) or input_maps(model):
        raise _refuse(model, "it is already sliced (it has residual shortcuts); slice the original model again with "
                             "a larger ratio instead")
    embeddings, head = adapter.embeddings(), adapter.head()
    if not isinstance(embeddings, nn.Embedding) or adapter.embeddings_path is None:
        raise _refuse(model, "its input embeddings are not an nn.Embedding")
    if head is None or adapter.head_path is None:
        raise _refuse(model, "it has no output head")
    _linear(model, adapter.head_path)
    if adapter.final_norm_path is None:
        raise _refuse(model, "it has no final norm after its blocks (a post-norm model?)")
    width = embeddings.embedding_dim
    layout = ResidualLayout(width, adapter.embeddings_path, adapter.head_path, adapter.final_norm_path,
                            adapter.heads_are_tied())
    for index, block in enumerate(adapter.blocks()):
        prefix = adapter.block_name(index)
        parts = adapter.block_parts(index)
        attention, mlp = parts.attention, parts.mlp
        if attention is None or attention.o is None or not ((attention.q and attention.k and attention.v)
                                                            or attention.qkv):
            raise _refuse(model, f"block {index} has no attention with query/key/value and output projections")
        if mlp is None or mlp.down is None or not (mlp.up or mlp.gate_up) or not mlp.module:
            raise _refuse(model, f"block {index} has no dense MLP module (a mixture of experts?)")
        norms = [name for name, child in block.named_children() if is_norm(child)]
        if len(norms) != 2:
            raise _refuse(model, f"block {index} has {len(norms)} norms ({', '.join(norms) or 'none'}), not the two "
                                 "of a pre-norm block (norms on the branch outputs are not rotation-invariant)")
        readers = [p for p in ((attention.qkv,) if attention.qkv else (attention.q, attention.k, attention.v))]
        mlp_readers = [p for p in ((mlp.gate_up,) if mlp.gate_up else (mlp.gate, mlp.up)) if p]
        layout.blocks.append(BlockLayout(
            index, prefix, f"{prefix}.{attention.module}", "", [f"{prefix}.{p}" for p in readers],
            f"{prefix}.{attention.o}", f"{prefix}.{mlp.module}", "", [f"{prefix}.{p}" for p in mlp_readers],
            f"{prefix}.{mlp.down}"))
        for path in [*layout.blocks[-1].attention_readers, layout.blocks[-1].attention_writer,
                     *layout.blocks[-1].mlp_readers, layout.blocks[-1].mlp_writer]:
            _linear(model, path)
        layout.blocks[-1].attention_norm, layout.blocks[-1].mlp_norm = (f"{prefix}.{n}" for n in norms)
    _confirm_by_probe(model, layout, probe_ids)
    for path in layout.norms():
        _check_rms_norm(model, path)
    return layout


@torch.no_grad()
def _confirm_by_probe(model: nn.Module, layout: ResidualLayout, probe_ids: torch.Tensor) -> None:
    """Record one forward pass and check the data flow the rotation relies on; the two norms of each block are
    told apart by which one the queries read."""
    seen: dict[str, dict[str, Any]] = {}
    handles = []

    def record(path: str):
        def hook(_module, args, kwargs, output):
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            seen[path] = {"input": inputs, "output": _first(output)}
        return hook

    paths = {layout.embeddings, layout.head, layout.final_norm}
    for block in layout.blocks:
        paths |= {block.path, block.attention, block.mlp, block.attention_norm, block.mlp_norm,
                  block.attention_readers[0], block.mlp_readers[0]}
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(record(path), with_kwargs=True))
    try:
        model(input_ids=probe_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(path not in seen for path in paths):
        missing = sorted(p for p in paths if p not in seen)[0]
        raise _refuse(model, f"{missing} is not called as a module in the forward pass")

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)

    embedded = seen[layout.embeddings]["output"].double()
    first_input = seen[layout.blocks[0].path]["input"].double()
    factor = float((first_input * embedded).sum() / embedded.square().sum().clamp_min(1e-30))
    if not same(first_input, factor * embedded):
        raise _refuse(model, "its first block does not receive the token embeddings (times a constant); "
                             "positional embeddings added to the stream are not rotated")
    for block in layout.blocks:
        norm_a, norm_b = block.attention_norm, block.mlp_norm
        reads = seen[block.attention_readers[0]]["input"]
        if same(reads, seen[norm_b]["output"]) and not same(reads, seen[norm_a]["output"]):
            norm_a, norm_b = norm_b, norm_a
        block.attention_norm, block.mlp_norm = norm_a, norm_b
        x = seen[block.path]["input"]
        attention_out, mlp_out = seen[block.attention]["output"], seen[block.mlp]["output"]
        checks = [(same(reads, seen[norm_a]["output"]), f"{block.attention_readers[0]} does not read a norm of the "
                                                        "stream"),
                  (same(seen[block.mlp_readers[0]]["input"], seen[norm_b]["output"]),
                   f"{block.mlp_readers[0]} does not read a norm of the stream"),
                  (same(seen[norm_a]["input"], x), f"{norm_a} does not read the block's input (a post-norm block?)"),
                  (same(seen[norm_b]["input"], x + attention_out),
                   f"{norm_b} does not read input + attention (parallel attention and MLP, or post-norm?)"),
                  (same(_first(seen[block.path]["output"]), x + attention_out + mlp_out),
                   f"block {block.index} does not output input + attention + MLP")]
        for ok, why in checks:
            if not ok:
                raise _refuse(model, why)
    last = _first(seen[layout.blocks[-1].path]["output"])
    if not same(seen[layout.final_norm]["input"], last) or \
            not same(seen[layout.head]["input"], seen[layout.final_norm]["output"]):
        raise _refuse(model, "its head does not read the final norm of the last block's output")


# ------------------------------------------------------------------------------ planning the width

@dataclass
class WidthPlan:
    """Parameters of the sliced model as a function of the kept width ``w``: ``fixed + per_width · w +
    shortcuts · w²``."""

    width: int
    before: int
    fixed: int
    per_width: int
    shortcuts: int

    def parameters_at(self, kept: int) -> int:
        return self.fixed + self.per_width * kept + self.shortcuts * kept * kept

    def kept_for(self, ratio: float, unit: int) -> int:
        candidates = sorted({*range(unit, self.width + 1, unit), self.width})
        return min(candidates, key=lambda kept: (abs(1 - self.parameters_at(kept) / self.before - ratio), -kept))


def plan_widths(model: nn.Module, layout: ResidualLayout, keep_tied: bool = False) -> WidthPlan:
    """``keep_tied``: a tied head stays tied (``head="tied"``); otherwise it is counted as untied."""
    keep_tied = keep_tied and layout.tied
    width = layout.width
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embeddings: nn.Embedding = model.get_submodule(layout.embeddings)
    head: nn.Linear = model.get_submodule(layout.head)
    # A tied head is the embeddings' table plus a d' × d' map; an untied one (or one about to be) its own table.
    per_width = embeddings.num_embeddings + (0 if keep_tied else head.out_features) + len(layout.norms())
    touched = embeddings.weight.numel() + (0 if layout.tied else head.weight.numel()) + len(layout.norms()) * width
    for block in layout.blocks:
        for path in [*block.attention_readers, *block.mlp_readers]:
            linear = model.get_submodule(path)
            per_width += linear.out_features
            touched += linear.weight.numel()
        for path in (block.attention_writer, block.mlp_writer):
            linear = model.get_submodule(path)
            per_width += linear.in_features + (linear.bias is not None)
            touched += linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
    return WidthPlan(width, before, before - touched, per_width, 2 * len(layout.blocks) + keep_tied)


# ------------------------------------------------------------------------------ folding the norms

@torch.no_grad()
def untie_head(model: nn.Module, layout: ResidualLayout) -> None:
    """Give the head its own copy of the embeddings and make the config say so (a saved model stays untied)."""
    if not layout.tied:
        return
    head = model.get_submodule(layout.head)
    head.weight = nn.Parameter(head.weight.detach().clone())
    for config in {id(c): c for c in (getattr(model, "config", None), text_config(model)) if c is not None}.values():
        config.tie_word_embeddings = False
    layout.tied = False


@torch.no_grad()
def fold_norms(model: nn.Module, layout: ResidualLayout) -> torch.Tensor | None:
    """Multiply each RMSNorm's scale into the columns of the linears reading it and set the scale to 1; the
    model computes the same function. A head still tied to the embeddings cannot take the final norm's scale:
    it is returned (float64) for the head's input map, and the final norm keeps it until then."""
    pairs = [(b.attention_norm, b.attention_readers) for b in layout.blocks]
    pairs += [(b.mlp_norm, b.mlp_readers) for b in layout.blocks]
    if not layout.tied:
        pairs.append((layout.final_norm, [layout.head]))
    for norm_path, readers in pairs:
        norm = model.get_submodule(norm_path)
        scale = norm.weight.detach().double()
        for path in readers:
            linear = model.get_submodule(path)
            linear.weight.copy_((linear.weight.double() * scale).to(linear.weight.dtype))
        norm.weight.fill_(1.0)
    if layout.tied:
        return model.get_submodule(layout.final_norm).weight.detach().double().clone()
    return None


# ------------------------------------------------------------------------------ PCA through the stream

def principal_axes(second_moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``Σ xᵀx`` as columns, by decreasing eigenvalue, each signed so that its largest
    component is positive (the sign eigh returns is arbitrary; fixing it makes runs reproducible)."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    order = torch.argsort(values, descending=True)
    vectors = vectors[:, order]
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[largest, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


class _SecondMoment:
    def __init__(self, width: int):
        self.total = torch.zeros(width, width, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.total += flat.T.cpu() @ flat.cpu()


@dataclass
class BlockBases:
    inward: torch.Tensor  # Q_in, d × d (float64)
    middle: torch.Tensor  # Q_mid
    outward: torch.Tensor  # Q_out


def _projector(basis: torch.Tensor, kept: int) -> torch.Tensor:
    sliced = basis[:, :kept]
    return sliced @ sliced.T


class _Passes:
    """Runs one block, unchanged, on the projected stream (see the module docstring), with hooks that gather
    the MLP input's second moment (first pass) or project the stream after the attention (second pass)."""

    def __init__(self, model: nn.Module, block: BlockLayout):
        self.norm_a = model.get_submodule(block.attention_norm)
        self.norm_b = model.get_submodule(block.mlp_norm)
        self.attention = model.get_submodule(block.attention)

    def middle_moment(self, run, width: int) -> torch.Tensor:
        moment = _SecondMoment(width)
        handle = self.norm_b.register_forward_pre_hook(lambda _m, args, kwargs: moment.add(
            args[0] if args else next(iter(kwargs.values()))), with_kwargs=True)
        try:
            run()
        finally:
            handle.remove()
        return moment.total

    def projected_outputs(self, run, projector: torch.Tensor) -> list[torch.Tensor]:
        """The block's outputs with the stream after the attention, ``x + a``, replaced by its projection."""
        residual: list[torch.Tensor] = []

        def remember(_module, args, kwargs):
            residual.append(args[0] if args else next(iter(kwargs.values())))

        def project(_module, _args, _kwargs, output):
            x = residual.pop()
            a = _first(output)
            stream = (x.double() + a.double()) @ projector.to(x.device)
            corrected = (stream - x.double()).to(a.dtype)
            return (corrected, *output[1:]) if isinstance(output, tuple) else corrected

        handles = [self.norm_a.register_forward_pre_hook(remember, with_kwargs=True),
                   self.attention.register_forward_hook(project, with_kwargs=True)]
        try:
            return run()
        finally:
            for handle in handles:
                handle.remove()


# ------------------------------------------------------------------------------ rotating and slicing

@torch.no_grad()
def _read_in(linear: nn.Linear, basis: torch.Tensor) -> None:
    """A linear reading the stream: ``W ← W Q'`` (its input columns follow the new axes)."""
    weight = (linear.weight.double() @ basis.to(linear.weight.device)).to(linear.weight.dtype)
    linear.weight = nn.Parameter(weight.contiguous())
    linear.in_features = weight.shape[1]


@torch.no_grad()
def _write_out(linear: nn.Linear, basis: torch.Tensor) -> None:
    """A linear writing the stream: ``W ← Q'ᵀ W``, ``b ← b Q'``."""
    device = linear.weight.device
    weight = (basis.T.to(device) @ linear.weight.double()).to(linear.weight.dtype)
    linear.weight = nn.Parameter(weight.contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter((linear.bias.double() @ basis.to(device)).to(linear.bias.dtype))
    linear.out_features = weight.shape[0]


@torch.no_grad()
def _resize_norm(norm: nn.Module, kept: int, width: int) -> None:
    """The norm over the kept axes made to divide by the full stream's RMS, as SliceGPT's ``RMSN`` does:
    ``sqrt(d/d') · x / sqrt(Σx²/d' + ε d/d') = x / sqrt(Σx²/d + ε)``."""
    weight = norm.weight
    norm.weight = nn.Parameter(torch.full((kept,), math.sqrt(width / kept), dtype=weight.dtype, device=weight.device))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (kept,)
    for name in EPSILON_ATTRIBUTES:  # the attribute the family's forward reads (kept by the shape spec on saving)
        if isinstance(getattr(norm, name, None), float):
            setattr(norm, name, getattr(norm, name) * width / kept)
            break


@torch.no_grad()
def _slice_block(model: nn.Module, block: BlockLayout, bases: BlockBases, kept: int, width: int) -> None:
    inward, middle, outward = (q[:, :kept] for q in (bases.inward, bases.middle, bases.outward))
    for path in block.attention_readers:
        _read_in(model.get_submodule(path), inward)
    _write_out(model.get_submodule(block.attention_writer), middle)
    for path in block.mlp_readers:
        _read_in(model.get_submodule(path), middle)
    _write_out(model.get_submodule(block.mlp_writer), outward)
    dtype = model.get_submodule(block.attention_writer).weight.dtype
    # The residual around the attention carries the stream from Q_in's axes to Q_mid's, around the MLP from
    # Q_mid's to Q_out's.
    for norm, branch, name, before, after in ((block.attention_norm, block.attention, "attention_shortcut", inward,
                                               middle),
                                              (block.mlp_norm, block.mlp, "mlp_shortcut", middle, outward)):
        _resize_norm(model.get_submodule(norm), kept, width)
        attach_shortcut(model, f"{block.path}.{name}", norm, branch, (before.T @ after).to(dtype))


@dataclass
class SliceResult:
    width: int
    kept: int
    bases: list[BlockBases]
    embedding_basis: torch.Tensor
    explained: list[float]  # entering block 0, then leaving each block: the stream's energy its kept axes hold

    def to_dict(self) -> dict:
        return {"hidden_before": self.width, "hidden_after": self.kept,
                "mean_kept_energy": sum(self.explained) / max(len(self.explained), 1),
                "kept_energy": [round(e, 6) for e in self.explained]}


def _kept_energy(moment: torch.Tensor, basis: torch.Tensor, kept: int) -> float:
    projected = basis[:, :kept].T @ moment @ basis[:, :kept]
    return float(projected.trace() / moment.trace().clamp_min(1e-30))


@torch.no_grad()
def rotate_and_slice(model: nn.Module, layout: ResidualLayout, calibration: torch.Tensor, batch_size: int,
                     kept: int, final_scale: torch.Tensor | None = None) -> SliceResult:
    """Rotate every block into its PCA bases and keep ``kept`` axes (``kept = width`` only rotates: the
    function computed is unchanged). The norms must be folded (``fold_norms``; ``final_scale`` is what it
    returned for a tied head)."""
    if layout.tied and final_scale is None:
        raise PrunekitError("a tied head needs the final norm's scale (what fold_norms returned)")
    adapter = adapter_for(model)
    width = layout.width
    steps = SequentialCalibration(adapter, None, "dense")
    steps.capture(model, calibration, batch_size)
    inputs = steps.inputs
    assert inputs is not None
    moment = _SecondMoment(width)
    for hidden in inputs.hidden:
        moment.add(hidden)
    embedding_basis = inward = principal_axes(moment.total)
    explained = [_kept_energy(moment.total, inward, kept)]
    projector = _projector(inward, kept)
    inputs.hidden = [(h.double() @ projector.to(h.device)).to(h.dtype) for h in inputs.hidden]
    batches = range(len(inputs.hidden))
    all_bases: list[BlockBases] = []
    blocks = adapter.blocks()
    with progress_bar("Rotating and slicing (slicegpt)", len(layout.blocks)) as bar:
        for block in layout.blocks:
            module = blocks[block.index]
            passes = _Passes(model, block)

            def run():
                return [inputs.call(module, block.index, b) for b in batches]

            middle = principal_axes(passes.middle_moment(run, width))
            outputs = passes.projected_outputs(run, _projector(middle, kept))
            moment = _SecondMoment(width)
            for output in outputs:
                moment.add(output)
            outward = principal_axes(moment.total)
            explained.append(_kept_energy(moment.total, outward, kept))
            projector = _projector(outward, kept)
            inputs.hidden = [(h.double() @ projector.to(h.device)).to(h.dtype) for h in outputs]
            bases = BlockBases(inward, middle, outward)
            _slice_block(model, block, bases, kept, width)
            all_bases.append(bases)
            inward = outward
            bar.advance()
    steps.inputs = None
    embeddings: nn.Embedding = model.get_submodule(layout.embeddings)
    table = (embeddings.weight.double() @ embedding_basis[:, :kept].to(embeddings.weight.device))
    embeddings.weight = nn.Parameter(table.to(embeddings.weight.dtype).contiguous())
    embeddings.embedding_dim = kept
    final_norm = model.get_submodule(layout.final_norm)
    _resize_norm(final_norm, kept, width)
    head = model.get_submodule(layout.head)
    if layout.tied:
        head.weight, head.in_features = embeddings.weight, kept
        # h' ↦ h' Q_L'ᵀ diag(γ) Q_0': back from the last block's axes, the final norm's scale, into the table's.
        mapping = inward[:, :kept].T @ (final_scale.unsqueeze(1) * embedding_basis[:, :kept])
        attach_input_map(model, TIED_HEAD_MAP, layout.head, mapping.to(head.weight.dtype))
    else:
        _read_in(head, inward[:, :kept])
    return SliceResult(width, kept, all_bases, embedding_basis, explained)


@SHRINK_METHODS.register("slicegpt")
class SliceGPT(ShrinkMethod):
    unit: int = Field(8, ge=1, description="the kept hidden width is a multiple of this (or the full width)")
    head: Literal["untie", "tied"] = Field("untie", description="a head tied to the embeddings: untie (its own "
                                                               "rotated table) or tied (one table, and a d' × d' map "
                                                               "before the head)")

    def check(self, model: nn.Module) -> None:
        vocabulary = model.get_input_embeddings().num_embeddings
        find_residual_layout(model, adapter_for(model), torch.arange(PROBE_TOKENS).remainder(vocabulary)[None])

    def prepare(self, model: nn.Module, calibration: torch.Tensor) -> tuple[ResidualLayout, WidthPlan]:
        """Check the model and plan its widths without changing it."""
        layout = find_residual_layout(model, adapter_for(model), calibration[:1, :PROBE_TOKENS])
        return layout, plan_widths(model, layout, keep_tied=self.head == "tied")

    def apply(self, model: nn.Module, calibration: torch.Tensor, ratio: float, batch_size: int) -> dict[str, Any]:
        layout, plan = self.prepare(model, calibration)
        kept = plan.kept_for(ratio, self.unit)
        planned = plan.parameters_at(kept)
        if planned >= plan.before:
            raise PrunekitError(f"slicegpt cannot remove {ratio:.0%} of the parameters: the residual shortcuts"
                                + (" and the untied head" if layout.tied and self.head == "untie" else "") + " add more than slicing "
                                f"{plan.width - kept} of {plan.width} hidden axes removes; choose a larger ratio")
        notes = []
        if layout.tied and self.head == "untie":
            notes.append(f"the head was tied to the embeddings; it was untied (its own {kept}-wide copy) to take the "
                         "final norm's scale and its own rotation")
            untie_head(model, layout)
        elif layout.tied:
            notes.append(f"the head stays tied to the embeddings, behind a {kept}² map of the final norm's scale and "
                         "the change of basis")
        final_scale = fold_norms(model, layout)
        result = rotate_and_slice(model, layout, calibration, batch_size, kept, final_scale)
        return {"method": self.settings(), "ratio": ratio, **result.to_dict(),
                "parameters_planned": planned, "shortcuts": 2 * len(layout.blocks), "notes": notes,
                "summary": (f"hidden width {result.width} → {result.kept} ({2 * len(layout.blocks)} residual "
                            f"shortcuts of {result.kept}²); the kept axes hold on average "
                            f"{result.to_dict()['mean_kept_energy']:.1%} of the calibration stream's energy"
                            + ("; " + "; ".join(notes) if notes else ""))}


__all__ = ["BlockLayout", "ResidualLayout", "SliceGPT", "SliceResult", "WidthPlan", "find_residual_layout",
           "fold_norms", "plan_widths", "principal_axes", "rotate_and_slice", "untie_head"]

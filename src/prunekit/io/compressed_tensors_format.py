"""The compressed-tensors sparse layouts (what llm-compressor saves and vLLM reads), written and read by prunekit.

A sparse layer's ``weight`` is replaced by the tensors of one of the library's two sparse compressors:

- ``sparse-bitmask`` (any sparsity): ``shape`` (int64, the dense shape), ``compressed`` (the kept values in
  row-major order, 1-D, in the weight's dtype), ``bitmask`` (uint8, each row packed along its last dimension,
  least significant bit first: ``rows × ceil(cols / 8)``) and ``row_offsets`` (int64, where each row starts
  in ``compressed``);
- ``sparse-24-bitmask`` (2:4 models): ``shape`` (int64, ``[2, 1]``), ``compressed`` (exactly two values of
  every four, ``rows × cols / 2``) and the same ``bitmask``.

Every other tensor is stored dense under its own name, and ``config.json`` carries the block the library
reads (``quantization_config``: ``quant_method: compressed-tensors`` and its ``sparsity_config``), with
targets and ignores chosen as llm-compressor chooses them: a layer is compressed when at least 49 % of it
is zero (and, for 2:4, it follows 2:4); each module type with more such layers than not is named as a
target and its other layers are ignored by name, otherwise the sparse layers are named one by one.

A kept value is decided on the bit pattern, not on ``!= 0``, so a ``-0.0`` is stored as a value and the
library's decompressor gives the weights back bit for bit (prunekit's own methods never leave one).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io import formats
from prunekit.io.safetensors_file import write_safetensors_one_by_one

FORMAT_NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, BITMASK_24)
# The compressed-tensors release whose sparse compressors this layout follows; the last one that ships them
# (later releases dropped sparse compression) and the one the tests decompress with.
LAYOUT_VERSION = "0.13.0"
SPARSITY_THRESHOLD = 0.49  # llm-compressor's: a layer at least this sparse is stored compressed
WEIGHTS_FILE = "model.safetensors"
TWO_FOUR = "2:4"
UNSTRUCTURED = "unstructured"
_PARTS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """Where a value must be stored: any bit pattern but +0.0 (so -0.0 and NaN survive)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]) != 0


def _follows_two_four(kept: torch.Tensor) -> bool:
    return kept.shape[-1] % 4 == 0 and int(kept.reshape(-1, 4).sum(dim=1).max()) <= 2


@dataclass
class SparsityLayout:
    """Which layers are stored compressed, and the ``sparsity_config`` block that says so."""

    format: str
    structure: str
    targets: set[str] = field(default_factory=set)  # module names whose weight is compressed
    config: dict[str, Any] = field(default_factory=dict)


def _weighted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.is_floating_point():
            yield name, module, weight.detach()


def sparsity_layout(model: nn.Module) -> SparsityLayout:
    """The layers llm-compressor would compress, its structure (2:4 when more than 80 % of the linear layers
    follow it) and its config block; masks baked in (a parametrized weight reads as its masked value)."""
    linear = [(name, weight) for name, module, weight in _weighted_modules(model) if isinstance(module, nn.Linear)]
    two_four = sum(_follows_two_four(_kept(weight)) for _, weight in linear)
    structure = TWO_FOUR if linear and two_four > 0.8 * len(linear) else UNSTRUCTURED
    chosen = BITMASK_24 if structure == TWO_FOUR else BITMASK
    by_type: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    targets = set()
    for name, module, weight in _weighted_modules(model):
        kept = _kept(weight)
        sparse = 1 - int(kept.sum()) / max(kept.numel(), 1) >= SPARSITY_THRESHOLD
        if sparse and (structure == UNSTRUCTURED or _follows_two_four(kept)):
            targets.add(name)
            by_type[type(module).__name__][0].append(name)
        else:
            by_type[type(module).__name__][1].append(name)
    target_list, ignore = [], []
    for type_name in sorted(by_type):
        sparse_names, dense_names = by_type[type_name]
        if len(sparse_names) >= len(dense_names):
            target_list.append(type_name)
            ignore.extend(dense_names)
        elif sparse_names:
            target_list.extend(sparse_names)
            ignore.extend(dense_names)
    config = {"format": chosen, "global_sparsity": global_sparsity(model), "ignore": ignore,
              "registry_requires_subclass": False, "sparsity_structure": structure, "targets": target_list}
    return SparsityLayout(chosen, structure, targets, config)


def global_sparsity(model: nn.Module) -> float:
    """Zeros over all parameters, each shared tensor once (llm-compressor's ``global_sparsity``)."""
    seen, total, zeros = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        zeros += parameter.numel() - int(torch.count_nonzero(parameter))
    return zeros / max(total, 1)


def encode_weight(weight: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """One weight as the named parts of ``layout`` (``shape``, ``compressed``, ``bitmask``[, ``row_offsets``])."""
    weight = weight.detach().cpu().contiguous()
    kept = _kept(weight)
    bitmask = torch.from_numpy(np.packbits(kept.numpy(), axis=-1, bitorder="little"))
    if layout == BITMASK:
        per_row = kept.reshape(-1, kept.shape[-1]).sum(dim=1)
        return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64), "compressed": weight[kept],
                "bitmask": bitmask, "row_offsets": torch.cumsum(per_row, 0) - per_row}
    if layout == BITMASK_24:
        if weight.dim() != 2 or not _follows_two_four(kept):
            raise ValueError(f"a weight of shape {list(weight.shape)} that does not follow 2:4 cannot be stored "
                             f"as {BITMASK_24}")
        # Exactly two stored values in every group of four: the kept ones first, then zeros in order.
        groups = kept.reshape(-1, 4).to(torch.int8)
        first_two = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
        stored = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, first_two, True).reshape(weight.shape)
        rows, columns = weight.shape
        return {"shape": torch.tensor([rows, columns], dtype=torch.int64).reshape(-1, 1),
                "compressed": weight[stored].reshape(rows, columns // 2),
                "bitmask": torch.from_numpy(np.packbits(stored.numpy(), axis=-1, bitorder="little"))}
    raise ValueError(f"unknown compressed-tensors layout {layout}")


def decode_weight(parts: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """The dense weight from its stored parts (prunekit's own reader; the tests check it against the library's)."""
    shape = [int(v) for v in parts["shape"].reshape(-1).tolist()]
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little")
    kept = torch.from_numpy(bits.reshape(shape).astype(bool))
    values = parts["compressed"].reshape(-1)
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[kept] = values
    return dense


def _stored_tensors(state: dict[str, torch.Tensor], layout: SparsityLayout) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in layout.targets:
            for part, value in encode_weight(tensor, layout.format).items():
                yield f"{module}.{part}", value
        else:
            yield name, tensor


def stored_bytes(state: dict[str, torch.Tensor], layout: SparsityLayout) -> int:
    """The bytes of tensor data the layout stores (the file adds only its header), encoded one tensor at a time."""
    return sum(tensor.numel() * tensor.element_size() for _, tensor in _stored_tensors(state, layout))


def quantization_config(layout: SparsityLayout) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``, keyed as llm-compressor writes it."""
    return {"quant_method": QUANT_METHOD, "sparsity_config": layout.config, "transform_config": {},
            "version": LAYOUT_VERSION}


def write_compressed_tensors(model: nn.Module, directory: Path, tokenizer=None) -> SparsityLayout:
    """``model`` (masks baked in, tied tensors once) in the compressed-tensors layout, with its config and
    tokenizer: a directory that the compressed-tensors library (and so vLLM) decompresses."""
    from prunekit.io.checkpoint import unique_state_dict

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise PrunekitError("the compressed-tensors format stores transformers models only (it needs a config.json)")
    state, _aliases = unique_state_dict(model)
    layout = sparsity_layout(model)
    write_safetensors_one_by_one(directory / WEIGHTS_FILE, _stored_tensors(state, layout), {"format": "pt"})
    config.save_pretrained(directory)
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text())
    data["architectures"] = [type(model).__name__]  # as save_pretrained records the class it saved
    data["quantization_config"] = quantization_config(layout)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return layout


def sparse_config_of(config: dict) -> dict | None:
    """The ``sparsity_config`` of a compressed-tensors config that uses one of the sparse layouts, else None."""
    block = config.get("quantization_config")
    if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
        return None
    sparsity = block.get("sparsity_config")
    return sparsity if isinstance(sparsity, dict) and sparsity.get("format") in SPARSE_FORMATS else None


def read_compressed_tensors_state(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors directory, sparse weights decompressed."""
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            stored.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise PrunekitError(f"corrupt weights file {file}: {exc}") from None
    parts = _PARTS[layout]
    modules = {name.rpartition(".")[0] for name in stored if name.endswith(".bitmask")}
    state = {name: tensor for name, tensor in stored.items() if name.rpartition(".")[0] not in modules
             or name.rpartition(".")[2] not in parts}
    for module in modules:
        try:
            state[f"{module}.weight"] = decode_weight({part: stored[f"{module}.{part}"] for part in parts}, layout)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise PrunekitError(f"corrupt compressed-tensors weight {module} in {path}: {exc}") from None
    return state


@formats.FORMATS.register(FORMAT_NAME)
class CompressedTensorsFormat(formats.ModelFormat):
    summary = "compressed-tensors sparse layouts (sparse-bitmask, sparse-24-bitmask), as llm-compressor saves them"
    priority = 5  # a Hugging Face directory by its config.json, marked by its quantization_config

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").exists()):
            return False
        try:
            return sparse_config_of(json.loads((path / "config.json").read_text())) is not None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False  # the generic format reports the corrupt config in its own words

    def identify(self, path: Path) -> formats.Identity:
        return formats.identify_config(formats.read_config(path))

    def load(self, path: Path, options: formats.LoadOptions) -> nn.Module:
        config = formats.read_config(path)
        layout = sparse_config_of(config)["format"]
        state = read_compressed_tensors_state(path, layout)
        if options.skeleton is not None:
            model = options.skeleton
        else:
            model = formats.build_skeleton(path, self.identify(path).architecture)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config  # the weights are dense once read
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        formats.refuse_mismatch(path, unexpected=unexpected)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        current = model.state_dict()
        formats.refuse_mismatch(path, missing=[k for k in missing if k not in current or current[k].is_meta])
        if options.dtype is not None:
            model.to(options.dtype)
        return model.eval()

    def save(self, model: nn.Module, directory: Path, tokenizer=None, **settings: Any) -> None:
        write_compressed_tensors(model, directory, tokenizer)


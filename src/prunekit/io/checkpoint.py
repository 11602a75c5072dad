"""Writing pruned models (a plain Hugging Face directory, or prunekit's compressed one) and reading the
compressed tensors back. Loading a whole model goes through ``prunekit.load`` (``io.formats``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io import sparse_format
from prunekit.io.atomic import atomic_directory
from prunekit.io.safetensors_file import Loader, write_safetensors, write_safetensors_one_by_one

COMPRESSED_WEIGHTS = "model.sparse.safetensors"
COMPRESSED_MARKER = "prunekit_compressed.json"
COMPRESSED_SUBDIR = "compressed"  # where a pruning run writes the compressed copy beside the dense model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every mask baked into its weight, under the weight's own name.

    Masks attached during training live in parametrizations (``...parametrizations.weight.original``);
    a saved checkpoint must not depend on them. The model itself is left untouched: squashing a deep
    copy is not an option because parametrized modules share their generated class.
    """
    from torch.nn.utils import parametrize

    state = model.state_dict()
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        for tensor_name in module.parametrizations.keys():
            inner = f"{prefix}parametrizations.{tensor_name}."
            for key in [k for k in state if k.startswith(inner)]:
                del state[key]
            state[f"{prefix}{tensor_name}"] = getattr(module, tensor_name).detach()
    return state


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict (masks baked in) without aliases, so tied weights are stored once, and the alias -> owner map."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, int, tuple], str] = {}
    for name, tensor in plain_state_dict(model).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        state[name] = tensor
    return state, aliases


def save_dense(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """A directory that ``transformers.AutoModel*.from_pretrained`` loads: dense tensors with zeros."""
    with atomic_directory(out_dir, overwrite) as tmp:
        write_dense(model, tmp, tokenizer)
    return Path(out_dir)


def write_dense(model: nn.Module, directory: Path, tokenizer=None) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=plain_state_dict(model))
    else:
        state, _ = unique_state_dict(model)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, codec: str = "zstd",
                    overwrite: bool = False) -> Path:
    with atomic_directory(out_dir, overwrite) as tmp:
        write_compressed(model, tmp, tokenizer, codec)
    return Path(out_dir)


def write_compressed(model: nn.Module, directory: Path, tokenizer=None, codec: str = "zstd") -> dict:
    state, aliases = unique_state_dict(model)
    manifest = write_compressed_shard(state, directory / COMPRESSED_WEIGHTS, codec, aliases)
    config = getattr(model, "config", None)
    marker = {"format": sparse_format.FORMAT_NAME, "version": sparse_format.FORMAT_VERSION, "codec": codec,
              "weights": COMPRESSED_WEIGHTS,
              "architecture": type(model).__name__ if config is not None else None}
    if config is not None:
        config.save_pretrained(directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(model, "can_generate") and model.can_generate():
            generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / COMPRESSED_MARKER).write_text(json.dumps(marker, indent=2))
    return manifest


def is_compressed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPRESSED_MARKER).exists()


def read_compressed_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a compressed directory (one weights file, or one per shard) and the alias map."""
    path = Path(path)
    try:
        marker = json.loads((path / COMPRESSED_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"corrupt compressed checkpoint marker in {path}: {exc}") from None
    files = marker.get("weights", COMPRESSED_WEIGHTS)
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for file in [files] if isinstance(files, str) else files:
        weights = path / file
        if not weights.exists():
            raise PrunekitError(f"{path} is marked compressed but {file} is missing")
        try:
            with safe_open(str(weights), framework="pt") as handle:
                manifest = sparse_format.metadata_to_manifest(handle.metadata())
            state.update(sparse_format.decode(load_file(str(weights)), manifest))
        except (SafetensorError, ValueError, KeyError, OSError, RuntimeError) as exc:
            raise PrunekitError(f"corrupt compressed checkpoint {weights}: {exc}") from None
        aliases.update(manifest.get("aliases", {}))
    return state, aliases


def write_compressed_shard(tensors: Mapping[str, torch.Tensor | Loader], path: Path, codec: str = "zstd",
                           aliases: dict[str, str] | None = None) -> dict:
    """One compressed weights file (a shard of a streamed model, or a whole small one), written atomically.
    Values may be loaders: each tensor is then read, encoded, written and dropped in turn."""
    if not any(callable(value) for value in tensors.values()):
        stored, manifest = sparse_format.encode(dict(tensors), codec=codec)
        manifest["aliases"] = aliases or {}
        write_safetensors(path, stored, sparse_format.manifest_to_metadata(manifest))
        return manifest
    manifest = sparse_format.new_manifest({})

    def payloads():
        for name, value in tensors.items():
            manifest["tensors"][name], parts = sparse_format.encode_tensor(value() if callable(value) else value, codec)
            for suffix in list(parts):
                yield f"{name}::{suffix}", parts.pop(suffix)

    manifest["aliases"] = aliases or {}
    write_safetensors_one_by_one(path, payloads(), lambda: sparse_format.manifest_to_metadata(manifest))
    return manifest

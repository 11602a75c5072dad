"""Safetensors checkpoints read tensor by tensor (memory-mapped) and written shard by shard."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from prunekit.errors import PrunekitError
from prunekit.io.atomic import write_text
from prunekit.io.checkpoint import COMPRESSED_MARKER
from prunekit.io.safetensors_file import TORCH_DTYPES, Loader, write_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEADER_LIMIT = 100 * 2**20  # safetensors refuses larger headers too


class ShardedCheckpoint:
    """A Hugging Face safetensors checkpoint (one file, or shards listed in an index), opened lazily.

    Every shard is checked up front (present, whole: its size matches the data its header
    describes, readable, holding the tensors the index promises), so a broken checkpoint fails
    before any work starts. A prunekit compressed directory (``compressed/`` of a streamed run)
    reads the same way; each tensor is decoded when it is asked for.

    No shard stays open between reads: safetensors maps a whole shard, and every page a read
    touches stays in the process's resident set for as long as the mapping lives, so handles
    kept open for the whole run grow the RSS to the size of the model (measured: 9.7 GB for a
    7.1 GB checkpoint) although only one block is in use.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._manifests: dict[str, dict] | None = None
        index = self.directory / INDEX
        if (self.directory / COMPRESSED_MARKER).exists():
            files = self._compressed_files()
            weight_map = None
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PrunekitError(f"{index} is corrupt: {exc}") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).exists():
            weight_map = None
            files = [SINGLE]
        elif any(self.directory.glob("*.bin")):
            raise PrunekitError(f"{self.directory} holds .bin weights; streaming needs safetensors "
                                "(load and save_pretrained it once)")
        else:
            raise PrunekitError(f"{self.directory} has no safetensors weights")
        self._keys: dict[str, set[str]] = {}
        self._layout: dict[str, tuple[list[int], str]] = {}  # plain shards: shape and safetensors dtype
        self.weight_map: dict[str, str] = {}
        for file in files:
            path = self.directory / file
            if not path.exists():
                raise PrunekitError(f"shard {file} of {self.directory} is missing")
            check_shard_size(path, f"shard {file} of {self.directory}")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = set(handle.keys())
                    if self._manifests is not None:
                        self._read_manifest(file, handle, keys)
                    else:
                        for key in keys:
                            tensor_slice = handle.get_slice(key)
                            self._layout[key] = (tensor_slice.get_shape(), tensor_slice.get_dtype())
            except (SafetensorError, OSError, ValueError) as exc:
                raise PrunekitError(f"shard {file} of {self.directory} is corrupt: {exc}") from None
            self._keys[file] = keys
            if self._manifests is None and weight_map is None:
                # Sorted, not in the set's order: that order follows PYTHONHASHSEED, and the tensors
                # outside the blocks are written in this order (a streamed run's last shard and its
                # manifest), so the output's bytes would differ from one run to the next.
                self.weight_map.update({key: file for key in sorted(keys)})
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self._keys[file]:
                    raise PrunekitError(f"shard {file} of {self.directory} lacks tensor {name} its index promises")
            self.weight_map = dict(weight_map)

    def _compressed_files(self) -> list[str]:
        marker = self.directory / COMPRESSED_MARKER
        try:
            files = json.loads(marker.read_text())["weights"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PrunekitError(f"{marker} is corrupt: {exc}") from None
        self._manifests = {}
        return [files] if isinstance(files, str) else list(files)

    def _read_manifest(self, file: str, handle, keys: set[str]) -> None:
        from prunekit.io import sparse_format

        try:
            manifest = sparse_format.metadata_to_manifest(handle.metadata())
        except (ValueError, json.JSONDecodeError) as exc:
            raise PrunekitError(f"shard {file} of {self.directory} is corrupt: {exc}") from None
        for name, entry in manifest["tensors"].items():
            parts = ("::dense",) if entry["encoding"] == "dense" else ("::bitmask", "::values")
            if any(name + part not in keys for part in parts):
                raise PrunekitError(f"shard {file} of {self.directory} lacks the stored data of {name}")
            self.weight_map[name] = file
            self._manifests[name] = {**manifest, "tensors": {name: entry}}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        try:
            file = self.weight_map[name]
            with safe_open(str(self.directory / file), framework="pt") as handle:
                if self._manifests is None:
                    return handle.get_tensor(name)
                stored = {key: handle.get_tensor(key) for key in sorted(self._keys[file]) if key.startswith(name + "::")}
            from prunekit.io import sparse_format

            return sparse_format.decode(stored, self._manifests[name])[name]
        except KeyError:
            raise PrunekitError(f"{self.directory} has no tensor {name}") from None
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise PrunekitError(f"cannot read {name} from {self.weight_map[name]}: {exc}") from None

    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self._keys)

    def fingerprint(self) -> dict:
        """Enough to tell whether a resumed run reads the same checkpoint."""
        return {file: (self.directory / file).stat().st_size for file in sorted(self._keys)}

    def tensor_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor once read, floating-point ones converted to ``dtype``."""
        total = 0
        for name in self.weight_map:
            if self._manifests is not None:
                entry = self._manifests[name]["tensors"][name]
                shape, stored = entry["shape"], getattr(torch, entry["dtype"])
            else:
                shape, stored = self._layout[name][0], _dtype(self._layout[name][1])
            target = dtype if dtype is not None and stored.is_floating_point else stored
            numel = 1
            for size in shape:
                numel *= size
            total += numel * torch.empty((), dtype=target).element_size()
        return total


def check_shard_size(path: Path, what: str) -> None:
    """Refuse a file shorter (or longer) than the data its safetensors header lays out.

    A copy cut short by a full disk or an interrupted download keeps a valid header; without
    this check it would be found only when the missing tensor is read, hours into a run.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise PrunekitError(f"{what} is truncated: {size} bytes, too short for a safetensors header")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > _HEADER_LIMIT or 8 + header_bytes > size:
                raise PrunekitError(f"{what} is truncated or corrupt: {size} bytes, its header claims "
                                    f"{8 + header_bytes}")
            header = json.loads(handle.read(header_bytes))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"{what} is corrupt: {exc}") from None
    if not isinstance(header, dict):
        raise PrunekitError(f"{what} is corrupt: its header is not a JSON object")
    try:
        data_end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise PrunekitError(f"{what} is corrupt: its header lacks valid data offsets") from None
    expected = 8 + header_bytes + data_end
    if size < expected:
        raise PrunekitError(f"{what} is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise PrunekitError(f"{what} is corrupt: {size} bytes, its header describes only {expected}")


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_shard(directory: Path, name: str, tensors: Mapping[str, torch.Tensor | Loader],
                metadata: dict[str, str] | None = None) -> None:
    """Write one shard atomically: a killed run leaves either the whole file or none (values may be loaders)."""
    write_safetensors(directory / name, tensors, {"format": "pt", **(metadata or {})})


def write_index(directory: Path, shards: list[str]) -> None:
    weight_map = {}
    total = 0
    for shard in shards:
        with safe_open(str(directory / shard), framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = shard
                tensor_slice = handle.get_slice(key)
                numel = 1
                for size in tensor_slice.get_shape():
                    numel *= size
                total += numel * torch.empty((), dtype=_dtype(tensor_slice.get_dtype())).element_size()
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    write_text(directory / INDEX, text)


# A compressed copy of pruned weights stays below this share of the dense one (bitmask + values at
# 50 % sparsity is about 0.53; layers kept dense count fully, hence the margin).
COMPRESSED_SHARE = 0.7


def saved_model_bytes(tensor_bytes: int, dense: bool = True, compressed: bool = False) -> int:
    """Bytes a pruned model of ``tensor_bytes`` takes once saved dense and/or compressed."""
    return (tensor_bytes if dense else 0) + (int(tensor_bytes * COMPRESSED_SHARE) if compressed else 0)


def model_tensor_bytes(model_dir: str | os.PathLike | None, dtype: torch.dtype | str | None = None) -> int:
    """Bytes of a model directory's tensors once loaded in ``dtype``: a job's estimate of what it will write.

    Read from the safetensors headers (exact); for other formats the weight files' sizes. 0 when
    there is nothing local to measure (a hub id), so the free-space check then passes.
    """
    if model_dir is None or not Path(model_dir).is_dir():
        return 0
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
    try:
        return ShardedCheckpoint(model_dir).tensor_bytes(dtype)
    except PrunekitError:  # no safetensors (or broken ones, which the loader reports in its own words)
        return sum(path.stat().st_size for path in Path(model_dir).iterdir()
                   if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".gguf"))


def _dtype(name: str) -> torch.dtype:
    dtype = TORCH_DTYPES.get(name)
    if dtype is None:
        raise PrunekitError(f"safetensors dtype {name} is not supported")
    return dtype

"""Safetensors checkpoints read tensor by tensor (memory-mapped) and written shard by shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prunekit.errors import PrunekitError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardedCheckpoint:
    """A Hugging Face safetensors checkpoint (one file, or shards listed in an index), opened lazily.

    Every shard named by the index is checked up front (present, readable header, holding the
    tensors the index promises), so a broken checkpoint fails before any work starts.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PrunekitError(f"{index} is corrupt: {exc}") from None
        elif (self.directory / SINGLE).exists():
            weight_map = None
        elif any(self.directory.glob("*.bin")):
            raise PrunekitError(f"{self.directory} holds .bin weights; streaming needs safetensors "
                                "(load and save_pretrained it once)")
        else:
            raise PrunekitError(f"{self.directory} has no safetensors weights")
        self._handles = {}
        self.weight_map: dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for file in files:
            path = self.directory / file
            if not path.exists():
                raise PrunekitError(f"shard {file} of {self.directory} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = set(handle.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise PrunekitError(f"shard {file} of {self.directory} is corrupt: {exc}") from None
            self._handles[file] = handle
            if weight_map is None:
                self.weight_map.update({key: file for key in keys})
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self._handles[file].keys():
                    raise PrunekitError(f"shard {file} of {self.directory} lacks tensor {name} its index promises")
            self.weight_map = dict(weight_map)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except KeyError:
            raise PrunekitError(f"{self.directory} has no tensor {name}") from None
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise PrunekitError(f"cannot read {name} from {self.weight_map[name]}: {exc}") from None

    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self._handles)

    def fingerprint(self) -> dict:
        """Enough to tell whether a resumed run reads the same checkpoint."""
        return {file: (self.directory / file).stat().st_size for file in sorted(self._handles)}


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one shard atomically: a killed run leaves either the whole file or none."""
    tmp = directory / f".{name}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, directory / name)


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
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[name]

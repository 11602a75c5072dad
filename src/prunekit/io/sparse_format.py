"""prunekit's compressed checkpoint format: bitmask + packed nonzeros, optionally entropy-coded.

A sparse tensor is stored as a packed bitmask (1 bit per element, numpy ``packbits`` order over
the flattened tensor) and the values it marks, in the tensor's own dtype. "Nonzero" is decided on
the bit pattern, so ``-0.0`` and NaN survive and the round trip is bit-exact. Tensors that are not
sparse enough to gain are kept dense. With the ``zstd`` codec, every stored payload additionally
has its bytes grouped by significance (all first bytes, then all second bytes, ...) and is
compressed losslessly; the exponent bytes of trained weights compress well.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

FORMAT_NAME = "prunekit-sparse"
FORMAT_VERSION = 1
CODECS = ("none", "zstd")

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements counted or compressed at a time: bounds the extra memory of encoding


def _bit_nonzero(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat
    return flat.view(_INT_VIEW[flat.element_size()]) != 0


def _count_bit_nonzero(tensor: torch.Tensor) -> int:
    """``_bit_nonzero(tensor).sum()`` without a mask of the whole tensor (a dense one never needs it)."""
    flat = tensor.contiguous().reshape(-1)
    bits = flat if flat.dtype == torch.bool else flat.view(_INT_VIEW[flat.element_size()])
    return sum(int(torch.count_nonzero(bits[start:start + _CHUNK])) for start in range(0, bits.numel(), _CHUNK))


def _to_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _unshuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    return raw.reshape(itemsize, -1).T.copy() if itemsize > 1 else raw


def _pack(payload: torch.Tensor, codec: str, level: int) -> torch.Tensor:
    raw = _to_bytes(payload)
    if codec == "zstd":
        import zstandard

        # Shuffled and compressed a chunk at a time, the compressed bytes kept where they were written:
        # a 315 MB embedding used to need three full copies of itself on top (the run's memory peak).
        itemsize = payload.element_size()
        planes = raw.reshape(-1, itemsize).T if itemsize > 1 else raw.reshape(1, -1)
        sink = io.BytesIO()
        compressor = zstandard.ZstdCompressor(level=level, threads=-1)
        with compressor.stream_writer(sink, size=raw.size, closefd=False) as writer:
            for plane in planes:
                for start in range(0, plane.shape[0], _CHUNK):
                    writer.write(np.ascontiguousarray(plane[start:start + _CHUNK]))
        return torch.frombuffer(sink.getbuffer(), dtype=torch.uint8)
    return torch.from_numpy(raw.copy())


def _unpack(stored: torch.Tensor, codec: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    raw = stored.numpy()
    itemsize = torch.empty((), dtype=dtype).element_size()
    if codec == "zstd":
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(raw.tobytes(), max_output_size=count * itemsize)
        raw = _unshuffle(np.frombuffer(bytearray(data), dtype=np.uint8), itemsize)
    raw = np.ascontiguousarray(raw).reshape(-1)
    if not raw.flags.writeable:
        raw = raw.copy()
    return torch.from_numpy(raw).view(dtype)[:count].clone()


def encode_tensor(tensor: torch.Tensor, codec: str = "zstd", level: int = 3) -> tuple[dict, dict[str, torch.Tensor]]:
    """One tensor's manifest entry and stored payloads (keyed by suffix: ``bitmask``/``values`` or ``dense``)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec}")
    tensor = tensor.detach().cpu()
    entry = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "codec": codec}
    kept = _count_bit_nonzero(tensor)
    itemsize = tensor.element_size()
    bitmask_bytes = (tensor.numel() + 7) // 8 + kept * itemsize
    if tensor.dim() >= 2 and tensor.is_floating_point() and bitmask_bytes < tensor.numel() * itemsize:
        entry.update(encoding="bitmask", nonzeros=kept)
        nonzero = _bit_nonzero(tensor)
        bits = np.packbits(nonzero.numpy())
        return entry, {"bitmask": _pack(torch.from_numpy(bits), codec, level),
                       "values": _pack(tensor.reshape(-1)[nonzero], codec, level)}
    entry.update(encoding="dense")
    return entry, {"dense": _pack(tensor, codec, level)}


def encode(state: dict[str, torch.Tensor], codec: str = "zstd", level: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """Turn a state dict into stored tensors and a manifest describing how to restore each one."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec}")
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, tensor in state.items():
        entries[name], payloads = encode_tensor(tensor, codec, level)
        stored.update({f"{name}::{suffix}": payload for suffix, payload in payloads.items()})
    return stored, new_manifest(entries)


def new_manifest(entries: dict[str, dict]) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": entries}


def decode(stored: dict[str, torch.Tensor], manifest: dict) -> dict[str, torch.Tensor]:
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    state: dict[str, torch.Tensor] = {}
    for name, entry in manifest["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        shape = tuple(entry["shape"])
        numel = int(np.prod(shape)) if shape else 1
        codec = entry["codec"]
        if entry["encoding"] == "dense":
            state[name] = _unpack(stored[f"{name}::dense"], codec, dtype, numel).reshape(shape)
            continue
        bits = _unpack(stored[f"{name}::bitmask"], codec, torch.uint8, (numel + 7) // 8)
        nonzero = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        values = _unpack(stored[f"{name}::values"], codec, dtype, entry["nonzeros"])
        tensor = torch.zeros(numel, dtype=dtype)
        tensor[nonzero] = values
        state[name] = tensor.reshape(shape)
    return state


def manifest_to_metadata(manifest: dict) -> dict[str, str]:
    return {"prunekit": json.dumps(manifest)}


def metadata_to_manifest(metadata: dict[str, str] | None) -> dict:
    if not metadata or "prunekit" not in metadata:
        raise ValueError("the file carries no prunekit manifest")
    return json.loads(metadata["prunekit"])


def manifest_size_without_codec(manifest: dict) -> int:
    """Bytes the stored tensors would take as plain bitmask + values (or dense), before entropy coding."""
    total = 0
    for entry in manifest["tensors"].values():
        itemsize = torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()
        numel = int(np.prod(entry["shape"])) if entry["shape"] else 1
        if entry["encoding"] == "dense":
            total += numel * itemsize
        else:
            total += (numel + 7) // 8 + entry["nonzeros"] * itemsize
    return total

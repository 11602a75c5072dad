"""The tensor-by-tensor safetensors writer produces files safetensors itself reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from prunekit.io.safetensors_file import write_safetensors


def test_mixed_dtypes_shapes_and_metadata_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
               "a.ids": torch.arange(3, dtype=torch.int64), "mask": torch.rand(9, generator=generator) > 0.5,
               "bytes": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=generator),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "strided": torch.randn(6, 4, generator=generator).t()}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt", "note": "kept"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "kept"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_unsupported_dtype_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert not list(tmp_path.iterdir())

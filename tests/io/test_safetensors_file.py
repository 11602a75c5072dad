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


def _tensors():
    generator = torch.Generator().manual_seed(1)
    return {"w": torch.randn(6, 8, generator=generator).to(torch.bfloat16), "ids": torch.arange(5),
            "flag": torch.tensor([True, False]), "b": torch.randn(3, generator=generator), "none": torch.zeros(0)}


def test_loaders_give_the_same_bytes_and_are_read_one_at_a_time(tmp_path):
    import gc
    import weakref

    tensors = _tensors()
    write_safetensors(tmp_path / "eager.safetensors", tensors, {"format": "pt"})
    alive = []

    def loader(name):
        def load():
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier tensor is still held"
            tensor = tensors[name].clone()
            alive.append(weakref.ref(tensor))
            return tensor
        return load

    write_safetensors(tmp_path / "lazy.safetensors", {name: loader(name) for name in tensors}, {"format": "pt"})
    assert len(alive) == len(tensors)
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eager.safetensors", "lazy.safetensors"]  # no scratch left


def test_a_failing_loader_leaves_no_file_and_no_scratch(tmp_path):
    def broken():
        raise OSError("shard vanished")

    with pytest.raises(OSError, match="shard vanished"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2), "b": broken})
    assert not list(tmp_path.iterdir())


def test_compressed_shard_from_loaders_equals_the_in_memory_one(tmp_path):
    from prunekit.io.checkpoint import write_compressed_shard

    tensors = _tensors()
    tensors["w"][:, ::2] = 0  # sparse enough for the bitmask encoding
    eager = write_compressed_shard(tensors, tmp_path / "eager.safetensors", aliases={"x": "w"})
    lazy = write_compressed_shard({n: (lambda t=t: t) for n, t in tensors.items()}, tmp_path / "lazy.safetensors",
                                  aliases={"x": "w"})
    assert lazy == eager and eager["tensors"]["w"]["encoding"] == "bitmask"
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()

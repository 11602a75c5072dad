import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.io import sparse_format


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(1, 9), st.integers(1, 33),
       st.floats(0.0, 1.0), st.sampled_from(["none", "zstd"]), st.integers(0, 999))
def test_round_trip_is_bit_exact(dtype, rows, cols, sparsity, codec, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    weight.view(-1)[0] = -0.0  # a negative zero must come back negative
    state = {"w": weight, "bias": torch.randn(cols).to(dtype), "step": torch.tensor(3), "flag": torch.tensor([True, False])}
    stored, manifest = sparse_format.encode(state, codec=codec)
    restored = sparse_format.decode(stored, manifest)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        assert torch.equal(_bits(restored[name]), _bits(tensor)), name


def test_sparse_tensors_use_bitmask_and_shrink():
    weight = torch.randn(256, 256)
    weight[torch.rand(256, 256) < 0.5] = 0
    stored, manifest = sparse_format.encode({"w": weight}, codec="none")
    assert manifest["tensors"]["w"]["encoding"] == "bitmask"
    size = sum(t.numel() * t.element_size() for t in stored.values())
    assert size == sparse_format.manifest_size_without_codec(manifest)
    assert size <= 0.6 * weight.numel() * 4


def test_dense_tensors_stay_dense():
    stored, manifest = sparse_format.encode({"w": torch.randn(64, 64)}, codec="none")
    assert manifest["tensors"]["w"]["encoding"] == "dense"


def test_bad_manifest_is_refused():
    with pytest.raises(ValueError):
        sparse_format.decode({}, {"format": "other", "version": 1, "tensors": {}})

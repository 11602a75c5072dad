import json

import pytest
import torch

from prunekit.core.masks import attach_mask
from prunekit.errors import PrunekitError
from prunekit.io.atomic import atomic_directory, check_output_dir
from prunekit.io.checkpoint import COMPRESSED_WEIGHTS, save_compressed, save_dense
from prunekit.models.loading import load
from prunekit.weights import prune_weights
from tests.conftest import tiny_llama


def _assert_bit_equal(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key].view(torch.uint8), state_b[key].view(torch.uint8)), key


@pytest.mark.parametrize("codec", ["none", "zstd"])
@pytest.mark.parametrize("tie", [True, False])
def test_both_formats_round_trip_bit_exact(tmp_path, codec, tie):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab=512, tie=tie)
    prune_weights(model, "magnitude", 0.5)
    save_dense(model, tmp_path / "dense")
    save_compressed(model, tmp_path / "compressed", codec=codec)
    _assert_bit_equal(model, AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))
    _assert_bit_equal(model, load(tmp_path / "dense"))
    restored = load(tmp_path / "compressed")
    _assert_bit_equal(model, restored)
    assert (restored.lm_head.weight is restored.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, restored(ids).logits)


def test_plain_modules_need_their_skeleton(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    attach_mask(net[0], torch.rand(8, 8) > 0.5)  # masks are squashed into the saved weights
    save_compressed(net, tmp_path / "c")
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    restored = load(tmp_path / "c", model=fresh)
    assert torch.equal(restored[0].weight, net[0].weight)
    assert "parametrizations" not in "".join(load(tmp_path / "c", model=fresh).state_dict())


def test_corrupt_compressed_checkpoint_is_one_line_error(tmp_path):
    model = tiny_llama(vocab=512)
    save_compressed(model, tmp_path / "c")
    (tmp_path / "c" / COMPRESSED_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(PrunekitError, match="corrupt compressed checkpoint"):
        load(tmp_path / "c")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_and_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(PrunekitError, match="--overwrite"):
        check_output_dir(target, overwrite=False)
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_equal_to_or_inside_input_is_refused(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    with pytest.raises(PrunekitError, match="is the input itself"):
        check_output_dir(source, overwrite=True, inputs=(str(source),))
    with pytest.raises(PrunekitError, match="inside the input"):
        check_output_dir(source / "sub", overwrite=False, inputs=(str(source),))


def test_compressed_size_bound_on_smollm2(smollm2, tmp_path):
    """At 50 % sparsity the compressed weights take at most 60 % of the dense ones, with either codec."""
    prune_weights(smollm2.model, "magnitude", 0.5)
    save_dense(smollm2.model, tmp_path / "dense")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sizes = {}
    for codec in ("zstd", "none"):
        save_compressed(smollm2.model, tmp_path / codec, codec=codec)
        sizes[codec] = (tmp_path / codec / COMPRESSED_WEIGHTS).stat().st_size
        marker = json.loads((tmp_path / codec / "prunekit_compressed.json").read_text())
        assert marker["codec"] == codec
    assert sizes["zstd"] <= 0.6 * dense
    restored = load(tmp_path / "zstd")
    _assert_bit_equal(smollm2.model, restored)
    # Without entropy coding the untouched tied embedding (21 % of the weights) keeps the total above 60 %;
    # the pruned block weights alone shrink to bitmask + half the values.
    assert 0.5 < sizes["none"] / dense < 0.66

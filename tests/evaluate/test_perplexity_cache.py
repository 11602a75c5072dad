"""The unpruned model's perplexity is measured once per model, windows and settings, then read from the cache."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit.weights.job as weights_job
from prunekit.cli import main
from prunekit.io.digest import directory_digest, file_digest

TINY = ["--method", "magnitude", "--ratio", "0.5", "--test-windows", "2", "--seq-len", "64", "--no-compressed"]


@pytest.fixture()
def measured(monkeypatch, tmp_path):
    """Each perplexity the prune job measures, by its progress description; the cache in a fresh folder."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    descriptions = []
    original = weights_job.perplexity

    def counting(model, windows, batch_size=4, description="Perplexity", group=None):
        descriptions.append(description)
        return original(model, windows, batch_size, description, group)

    monkeypatch.setattr(weights_job, "perplexity", counting)
    return descriptions


def _prune(model_dir, out, *extra):
    assert main(["prune", str(model_dir), *TINY, *extra, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_second_run_reads_the_dense_perplexity_from_the_cache(tiny_model_dir, tmp_path, measured):
    first = _prune(tiny_model_dir, tmp_path / "a")
    assert measured == ["Perplexity before", "Perplexity after"]
    assert first["perplexity"]["before_from_cache"] is False
    measured.clear()
    second = _prune(tiny_model_dir, tmp_path / "b")
    assert measured == ["Perplexity after"], "the dense model was evaluated again"
    assert second["perplexity"]["before_from_cache"] is True
    assert second["perplexity"]["before"] == first["perplexity"]["before"]
    assert second["perplexity"]["after"] == first["perplexity"]["after"]
    assert "from the cache" in (tmp_path / "b" / "report.md").read_text()


def test_a_streamed_run_reads_its_own_cached_figure(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    streamed = []
    original = weights_job.streamed_perplexity

    def counting(directory, windows, batch_size=4, device="cpu", description="Perplexity (streamed)"):
        streamed.append(description)
        return original(directory, windows, batch_size, device, description)

    monkeypatch.setattr(weights_job, "streamed_perplexity", counting)
    first = _prune(tiny_model_dir, tmp_path / "a", "--stream")
    second = _prune(tiny_model_dir, tmp_path / "b", "--stream")
    assert streamed == ["Perplexity before (streamed)", "Perplexity after (streamed)", "Perplexity after (streamed)"]
    assert second["perplexity"]["before_from_cache"] and second["perplexity"]["before"] == first["perplexity"]["before"]


def test_a_changed_weight_or_protocol_misses_the_cache(tiny_model_dir, tmp_path, measured):
    first = _prune(tiny_model_dir, tmp_path / "a")
    measured.clear()
    # Another protocol (more test windows): measured again.
    _prune(tiny_model_dir, tmp_path / "b", "--test-windows", "3")
    assert measured == ["Perplexity before", "Perplexity after"]
    # Another batch size changes the arithmetic, so it is another key too.
    measured.clear()
    _prune(tiny_model_dir, tmp_path / "c", "--batch-size", "1")
    assert measured == ["Perplexity before", "Perplexity after"]
    # One changed weight, same file size: measured again, and the figure is that of the new weights.
    weights_file = tiny_model_dir / "model.safetensors"
    tensors = load_file(weights_file)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name][0, 0] += 1.0
    save_file(tensors, weights_file, metadata={"format": "pt"})
    measured.clear()
    changed = _prune(tiny_model_dir, tmp_path / "d")
    assert measured == ["Perplexity before", "Perplexity after"]
    assert changed["perplexity"]["before_from_cache"] is False
    assert changed["perplexity"]["before"] != first["perplexity"]["before"]


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.arange(6.0)}, folder / "model.safetensors")
    (folder / ".model.lock").write_text("not part of the model")
    digest = directory_digest(folder)
    assert file_digest(folder / "model.safetensors").startswith("sha256:")
    (folder / ".model.lock").write_text("still not part of the model")
    assert directory_digest(folder) == digest
    save_file({"w": torch.arange(6.0) + 1}, folder / "model.safetensors")
    assert directory_digest(folder) != digest
    # A hub cache blob is named by its content: no hashing.
    blob = tmp_path / "hub" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    (folder / "linked.safetensors").symlink_to(blob)
    assert file_digest(folder / "linked.safetensors") == f"hub:{'ab' * 32}"

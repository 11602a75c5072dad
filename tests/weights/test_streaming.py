"""Out-of-core pruning: equal to the in-memory path, resumable after SIGKILL, strict about its inputs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.weights import prune_weights
from prunekit.weights.streaming import STATE_FILE, partial_dir, prune_streaming
from tests.conftest import tiny_llama


def _state(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def smollm2_windows(tokenizer):
    from prunekit.core.text import TextProtocol, calibration_windows

    return calibration_windows(tokenizer, TextProtocol(calibration_samples=4, seq_len=128))


# SparseGPT prunes the first blocks only (the rest is streamed through unchanged) to keep the test short.
@pytest.mark.parametrize("method,pattern,include", [("wanda", None, ()), ("sparsegpt", "2:4", ("model.layers.[0-3].*",))])
def test_streaming_equals_in_memory_on_smollm2(smollm2, smollm2_dir, smollm2_windows, tmp_path, method, pattern,
                                               include):
    ratio = None if pattern else 0.5
    prune_weights(smollm2.model, method, ratio, pattern=pattern, calibration=smollm2_windows, include=include)
    prune_streaming(smollm2_dir, tmp_path / "out", method=method, ratio=ratio, pattern=pattern,
                    calibration=smollm2_windows, save_compressed=False, include=include)
    streamed = _state(tmp_path / "out")
    reference = smollm2.model.state_dict()
    assert set(streamed) == set(reference) - {"lm_head.weight"}
    for name, tensor in streamed.items():
        assert torch.equal(tensor, reference[name]), name


def _tiny_checkpoint(root: Path, tokenizer, layers: int = 6, hidden: int = 128) -> Path:
    path = root / "model"
    tiny_llama(layers=layers, hidden=hidden, intermediate=2 * hidden).save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    return path


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PRUNEKIT_QUIET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "prunekit", "prune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


COMMON = ["--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "8", "--seq-len", "256", "--no-eval",
          "--stream"]


def test_killed_run_resumes_to_the_same_model(tmp_path, tokenizer):
    model = _tiny_checkpoint(tmp_path, tokenizer, layers=8, hidden=256)
    reference = tmp_path / "reference"
    done = _cli(str(model), *COMMON, "--out", str(reference))
    assert done.wait(timeout=300) == 0, done.stderr.read()

    out = tmp_path / "out"
    state_file = partial_dir(out) / STATE_FILE
    run = _cli(str(model), *COMMON, "--out", str(out))
    deadline = time.time() + 300
    while time.time() < deadline:
        if state_file.exists() and json.loads(state_file.read_text() or "{}").get("completed_blocks", 0) >= 3:
            break
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists() and partial_dir(out).exists()
    completed = json.loads(state_file.read_text())["completed_blocks"]
    assert 3 <= completed < 8

    again = _cli(str(model), *COMMON, "--out", str(out))  # without --resume: refused, partial run kept
    assert again.wait(timeout=120) == 2 and "add --resume" in again.stderr.read()

    resumed = _cli(str(model), *COMMON, "--out", str(out), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert not partial_dir(out).exists()
    assert _hashes(out) == _hashes(reference)
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["resumed_from_block"] == completed

    # The same command once more: the run is finished, so it only reports so and changes nothing.
    assert main(["prune", str(model), *COMMON, "--out", str(out), "--resume"]) == 0
    assert _hashes(out) == _hashes(reference)
    assert json.loads((out / "report.json").read_text()) == report


def test_resume_with_other_settings_is_refused(tmp_path, tokenizer):
    model = _tiny_checkpoint(tmp_path, tokenizer, layers=2, hidden=64)
    windows = torch.randint(0, 1000, (4, 32))
    out = tmp_path / "out"
    work = partial_dir(out)
    work.mkdir()
    (work / STATE_FILE).write_text(json.dumps({"settings": {"method": {"name": "wanda"}, "sparsity": 0.5},
                                               "completed_blocks": 1}))
    with pytest.raises(PrunekitError, match="other settings .*method"):
        prune_streaming(model, out, method="sparsegpt", calibration=windows, resume=True)
    with pytest.raises(PrunekitError, match="nothing to resume"):
        prune_streaming(model, tmp_path / "elsewhere", method="wanda", calibration=windows, resume=True)


def test_missing_and_corrupt_shards(tmp_path, tokenizer):
    model = _tiny_checkpoint(tmp_path, tokenizer, layers=4, hidden=128)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    windows = torch.randint(0, 1000, (4, 32))
    shards[1].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(PrunekitError, match=f"shard {shards[1].name} .* is corrupt"):
        prune_streaming(model, tmp_path / "out", method="wanda", calibration=windows)
    shards[1].unlink()
    with pytest.raises(PrunekitError, match=f"shard {shards[1].name} .* is missing"):
        prune_streaming(model, tmp_path / "out", method="wanda", calibration=windows)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_too_little_disk_is_refused_before_starting(tmp_path, tokenizer, monkeypatch):
    import shutil

    model = _tiny_checkpoint(tmp_path, tokenizer, layers=2, hidden=64)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(PrunekitError, match="not enough disk space"):
        prune_streaming(model, tmp_path / "out", method="magnitude")
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def _untied_checkpoint(root: Path, layers: int = 4) -> Path:
    path = root / "model"
    tiny_llama(layers=layers, hidden=64, intermediate=128, vocab=512, tie=False).save_pretrained(
        path, max_shard_size="60KB")
    return path


# OWL (its dense pass over the streamed blocks) and global allocation (scores read from disk),
# with the head pruned after the last block, and a compute dtype other than the checkpoint's.
@pytest.mark.parametrize("method,allocation,dtype", [
    ("wanda", {"name": "owl", "threshold_m": 2.0}, torch.float32),
    ("magnitude", "global", torch.float32),
    ("sparsegpt", {"name": "owl", "threshold_m": 2.0}, torch.bfloat16),
])
def test_allocations_stream_like_in_memory(tmp_path, method, allocation, dtype):
    from transformers import LlamaForCausalLM

    path = _untied_checkpoint(tmp_path)
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    include = ["model.layers.*", "lm_head"]
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    in_memory = prune_weights(model, method, 0.5, allocation=allocation, calibration=windows, include=include)
    streamed = prune_streaming(path, tmp_path / "out", method=method, ratio=0.5, allocation=allocation,
                               calibration=windows, include=include, dtype=dtype, save_compressed=False)
    allocated = {layer.name: layer.target_sparsity for layer in in_memory.layers}
    assert len(set(allocated.values())) > 1, "the allocation did not vary: the test would not see a difference"
    assert {layer.name: layer.target_sparsity for layer in streamed.result.layers} == allocated
    reference = model.state_dict()
    state = _state(tmp_path / "out")
    assert set(state) == set(reference)
    for name, tensor in state.items():
        assert tensor.dtype == dtype and torch.equal(tensor, reference[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_stream_honours_dtype_and_no_dense(tiny_model_dir, tmp_path):
    from prunekit.models.loading import load

    common = ["prune", str(tiny_model_dir), "--method", "magnitude", "--no-eval", "--dtype", "bfloat16"]
    memory, stream, only = tmp_path / "memory", tmp_path / "stream", tmp_path / "compressed-only"
    assert main([*common, "--out", str(memory)]) == 0
    assert main([*common, "--stream", "--out", str(stream)]) == 0
    assert main([*common, "--stream", "--no-dense", "--out", str(only)]) == 0
    reference = load_file(str(memory / "model.safetensors"))
    streamed = _state(stream)
    assert set(streamed) == set(reference)
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name]), name
    assert json.loads((stream / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(only.glob("*.safetensors")) and not (only / "model.safetensors.index.json").exists()
    assert _hashes(only / "compressed") == _hashes(stream / "compressed")
    restored = load(only / "compressed").state_dict()
    for name, tensor in streamed.items():
        assert torch.equal(restored[name], tensor), name
    report = json.loads((only / "report.json").read_text())
    assert report["recipe"]["dtype"] == "bfloat16" and report["recipe"]["save_dense"] is False


def test_no_dense_stream_evaluates_the_compressed_copy(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says that pruning a model block by block keeps memory low."
                                  for i in range(40)))
    args = ["prune", str(tiny_model_dir), "--method", "magnitude", "--stream", "--calib", str(text), "--test",
            str(text), "--calib-samples", "1", "--test-windows", "2", "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "dense")]) == 0
    assert main([*args, "--no-dense", "--out", str(tmp_path / "compressed")]) == 0
    dense, compressed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("dense", "compressed"))
    assert compressed["perplexity"]["after"] == dense["perplexity"]["after"] != dense["perplexity"]["before"]
    assert compressed["sparsity"]["achieved_in_model"] == dense["sparsity"]["achieved_in_model"] > 0


REMOTE_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class RemoteLlamaConfig(LlamaConfig):
    model_type = "llama"


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
"""


def test_stream_trust_remote_code(tiny_model_dir, tmp_path, capsys):
    (tiny_model_dir / "remote_llama.py").write_text(REMOTE_CODE)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote_llama.RemoteLlamaConfig",
                          "AutoModelForCausalLM": "remote_llama.RemoteLlamaForCausalLM"}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    args = ["prune", str(tiny_model_dir), "--method", "magnitude", "--stream"]

    def architecture(out: Path) -> str:
        return json.loads((out / "compressed" / "prunekit_compressed.json").read_text())["architecture"]

    assert main([*args, "--trust-remote-code", "--no-eval", "--out", str(tmp_path / "trusted")]) == 0
    assert architecture(tmp_path / "trusted") == "RemoteLlamaForCausalLM"
    assert (tmp_path / "trusted" / "remote_llama.py").exists()
    assert main([*args, "--no-eval", "--out", str(tmp_path / "built-in")]) == 0
    assert architecture(tmp_path / "built-in") == "LlamaForCausalLM"
    capsys.readouterr()
    assert main([*args, "--trust-remote-code", "--out", str(tmp_path / "evaluated")]) == 2
    err = capsys.readouterr().err
    assert "add --no-eval" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "evaluated").exists() and not partial_dir(tmp_path / "evaluated").exists()


def test_truncated_shard_is_refused_before_starting(tmp_path, tokenizer):
    model = _tiny_checkpoint(tmp_path, tokenizer, layers=4, hidden=128)
    shard = sorted(model.glob("model-*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4096])
    with pytest.raises(PrunekitError, match=f"shard {shard.name} of .* is truncated"):
        prune_streaming(model, tmp_path / "out", method="magnitude")
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_asymmetric_calibration_streams_like_in_memory(tmp_path):
    """The dense twin stream runs beside the pruned one block by block from disk, as it does in memory."""
    from transformers import LlamaForCausalLM

    path = _untied_checkpoint(tmp_path)
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    model = LlamaForCausalLM.from_pretrained(path).eval()
    in_memory = prune_weights(model, "sparsegpt", 0.5, calibration=windows, asymmetric=True)
    streamed = prune_streaming(path, tmp_path / "out", method="sparsegpt", ratio=0.5, calibration=windows,
                               asymmetric=True, save_compressed=False)
    assert in_memory.sequential == streamed.result.sequential == "layer, asymmetric"
    reference = model.state_dict()
    for name, tensor in _state(tmp_path / "out").items():
        assert torch.equal(tensor, reference[name]), name

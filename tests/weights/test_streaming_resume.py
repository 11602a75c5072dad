"""A streamed run SIGKILLed after any step and resumed writes byte-identical output.

The run is forked (no interpreter start-up, so every step of the sequence can be tried in
seconds) and kills itself with ``PRUNEKIT_FAULT_AT``; the resumed run goes on in this process.
"""

import hashlib
import json
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch

from prunekit.weights.streaming import FAULT_ENV, FAULT_POINTS, STATE_FILE, partial_dir, prune_streaming
from tests.conftest import tiny_llama

LAYERS = 3
# Wanda with OWL over the blocks and the (untied) head: a dense pass, calibration activations
# carried from block to block, and a head that needs the activations after the last block.
SETTINGS = dict(method="wanda", ratio=0.5, allocation="owl", include=["model.layers.*", "lm_head"],
                codec="zstd")


def _points() -> list[str]:
    points = []
    for point in FAULT_POINTS:
        if point.endswith(":"):
            points += [f"{point}{block}" for block in range(LAYERS)]
        else:
            points.append(point)
    return points


@pytest.fixture(scope="module")
def single_thread():
    # Identical bytes across processes need identical float summation order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, single_thread) -> Path:
    path = tmp_path_factory.mktemp("resume") / "model"
    tiny_llama(layers=LAYERS, hidden=64, intermediate=128, vocab=512, tie=False).save_pretrained(
        path, max_shard_size="60KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(0))


def _finalize(work: Path, outcome) -> None:
    # Stands in for the job's reports: everything in it must come out the same after a resume.
    summary = {"layers": [vars(layer) for layer in outcome.result.layers], "dense": outcome.dense_bytes,
               "compressed": outcome.compressed_bytes, "plain": outcome.compressed_without_codec_bytes,
               "windows": outcome.result.calibration_windows}
    (work / "finalized.json").write_text(json.dumps(summary, sort_keys=True, default=list))


def _prune(checkpoint: Path, windows: torch.Tensor, out: Path, **kwargs):
    return prune_streaming(checkpoint, out, calibration=windows, finalize=_finalize, **SETTINGS, **kwargs)


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def _killed_at(point: str, checkpoint: Path, windows: torch.Tensor, out: Path, resume: bool = False) -> None:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            os.environ[FAULT_ENV] = point
            _prune(checkpoint, windows, out, resume=resume)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the run to kill at {point} hung")
        time.sleep(0.01)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"{point}: the run was not killed there (exit status {status})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, windows) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reference") / "out"
    _prune(checkpoint, windows, out)
    tree = _tree(out)
    assert "finalized.json" in tree and any(name.startswith("compressed/") for name in tree)
    return tree


def test_fault_points_are_distinct_and_only_the_named_one_fires(checkpoint, windows, reference, tmp_path,
                                                               monkeypatch):
    points = _points()
    assert len(points) == len(set(points))
    # A point that names no step (here: a block past the last) lets the run finish untouched.
    monkeypatch.setenv(FAULT_ENV, f"shard:{LAYERS}")
    _prune(checkpoint, windows, tmp_path / "out")
    assert _tree(tmp_path / "out") == reference


@pytest.mark.parametrize("point", _points())
def test_resume_after_a_kill_at_each_step_is_byte_identical(point, checkpoint, windows, reference, tmp_path):
    out = tmp_path / "out"
    _killed_at(point, checkpoint, windows, out)
    assert out.exists() == (point == "renamed")  # nothing but a finished run is ever called OUT
    if not out.exists():
        state = json.loads((partial_dir(out) / STATE_FILE).read_text())
        assert state.get("status") != "complete" or point == "complete"
    outcome = _prune(checkpoint, windows, out, resume=True)
    assert not partial_dir(out).exists()
    assert _tree(out) == reference
    assert outcome.already_finished == (point in ("complete", "renamed"))
    finished = json.loads((out / STATE_FILE).read_text())
    assert finished["status"] == "complete" and finished["completed_blocks"] == LAYERS
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or p.name.startswith("activations")]
    assert not leftovers


def test_killed_again_while_resuming(checkpoint, windows, reference, tmp_path):
    # Killed a second time in the very step the first kill interrupted, then resumed.
    out = tmp_path / "out"
    _killed_at("activations:1", checkpoint, windows, out)
    _killed_at("activations:1", checkpoint, windows, out, resume=True)
    outcome = _prune(checkpoint, windows, out, resume=True)
    assert outcome.resumed_from_block == 1
    assert _tree(out) == reference

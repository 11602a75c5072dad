"""Two gloo processes calibrate like one: the same masks and (within float summation order) weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_llama

# The tolerance users are promised (docs/streaming.md states these numbers; see the last test).
RTOL, ATOL, PERPLEXITY_REL = 1e-4, 1e-6, 1e-4


def _run(args, processes):
    env = dict(os.environ, PRUNEKIT_QUIET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "prunekit"] if processes > 1 else [sys.executable, "-m", "prunekit"]
    done = subprocess.run([*launcher, "prune", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _weights(directory):
    state = {}
    for file in directory.glob("*.safetensors"):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("method,stream", [("wanda", False), ("sparsegpt", True)])
def test_two_ranks_equal_one(tmp_path, tokenizer, method, stream):
    model = tmp_path / "model"
    tiny_llama(layers=3, hidden=64, intermediate=128).save_pretrained(model)
    tokenizer.save_pretrained(model)
    common = [str(model), "--method", method, "--calib-samples", "8", "--seq-len", "64", "--test-windows", "4",
              "--no-compressed", *(["--stream"] if stream else [])]
    _run([*common, "--out", str(tmp_path / "one")], 1)
    _run([*common, "--out", str(tmp_path / "two")], 2)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name] == 0, two[name] == 0), f"masks differ at {name}"
        torch.testing.assert_close(one[name], two[name], rtol=RTOL, atol=ATOL)
    import json

    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[1]["run"]["processes"] == 2
    assert reports[0]["perplexity"]["after"] == pytest.approx(reports[1]["perplexity"]["after"], rel=PERPLEXITY_REL)


def test_the_docs_state_the_tolerance():
    def short(value: float) -> str:  # 1e-4, as written in prose
        return f"{value:.0e}".replace("e-0", "e-")

    docs = " ".join((Path(__file__).parents[2] / "docs" / "streaming.md").read_text().split())
    assert "masks identical" in docs
    assert f"rtol = {short(RTOL)}" in docs and f"atol = {short(ATOL)}" in docs
    assert f"perplexity after pruning within a relative {short(PERPLEXITY_REL)}" in docs

"""The CLI's promise for every command: one line and exit 2 for what the user can fix, one line and
exit 130 on Ctrl-C saying what was kept, one writer per output, outputs as readable as any other file."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunekit.cli import contract, main
from prunekit.io.lock import held_outputs, lock_file_of
from prunekit.weights.streaming import partial_dir

FAST = ["--method", "magnitude", "--no-eval"]
STREAM = ["--stream", "--method", "wanda", "--calib-samples", "2", "--seq-len", "64", "--no-eval"]


def _line(capsys) -> str:
    """The one line a command printed on stderr (it must be exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return " ".join(lines[0].split())


def _no_leftovers(parent: Path, out: Path) -> None:
    """Nothing of ``out`` exists: no output, no temporary, no lock file."""
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.fixture()
def csv_data(tmp_path) -> Path:
    path = tmp_path / "points.csv"
    path.write_text("a,b,label\n" + "".join(f"{i * 0.1},{i % 3},{i % 2}\n" for i in range(40)))
    return path


# ----------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("args,message", [
    (["prune", "--sparsity", "abc", "--out", "OUT"], "Invalid value for '--sparsity'"),
    (["prune", "--bogus", "--out", "OUT"], "No such option: --bogus"),
    (["prune"], "Missing option '--out'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["tokens", "eval", "fashion-vit", "--out", "OUT", "--samples", "0"], "Invalid value for '--samples'"),
    (["tokens", "eval", "fashion-vit", "--out", "OUT", "--warmup", "-1"], "Invalid value for '--warmup'"),
    (["data", "score", "fashion-mnist", "--out", "OUT"], "Missing option '--score'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    line = _line(capsys)
    assert line.startswith("error:") and message in line and "--help" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("command", ["eval", "prune"])
def test_a_batch_size_below_1_is_one_line_and_exit_2_before_any_load(command, value, monkeypatch, tmp_path,
                                                                     capsys):
    """Issue 16, item 7: `eval --batch-size 0` used to end in an internal error (exit 1) after loading."""
    monkeypatch.setattr("prunekit.weights.job.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    args = {"eval": ["eval", "smollm2"],
            "prune": ["prune", "smollm2", *FAST, "--out", str(out)]}[command]
    assert main([*args, "--batch-size", value]) == 2
    line = _line(capsys)
    assert line.startswith("error:") and "batch_size" in line and "greater than or equal to 1" in line, line
    _no_leftovers(tmp_path, out)


def test_main_handles_the_exceptions_the_installed_typer_raises():
    """typer 0.29 raises its own click's classes (typer._click), not the click package's."""
    from prunekit.cli import _invoke

    with pytest.raises(Exception) as raised:
        _invoke(["prune", "--sparsity", "abc", "--out", "x"])
    assert isinstance(raised.value, contract.USAGE_ERRORS), type(raised.value).__mro__
    with pytest.raises(Exception) as raised:
        _invoke(["prune", "--help"])
    assert isinstance(raised.value, contract.EXITS) and raised.value.exit_code == 0


def test_the_typer_version_is_pinned_to_what_is_tested():
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from packaging.requirements import Requirement

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    requirements = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    typer_requirement = next(r for r in requirements if r.name == "typer")
    assert typer_requirement.specifier.contains(version("typer"))
    assert any(spec.operator == "<" for spec in typer_requirement.specifier), "no upper bound on typer"


def test_help_exits_0(capsys):
    assert main([]) == 0
    printed = capsys.readouterr()
    assert "prune" in printed.out + printed.err
    assert main(["prune", "--help"]) == 0


# ------------------------------------------------------------------ one rule for shared options

def _commands(model: str, data: str, option: list[str]) -> dict[str, list[str]]:
    return {
        "prune": ["prune", model, *option],
        "shrink": ["shrink", model, *option],
        "train fashion-mnist": ["train", "fashion-mnist", *option],
        "train recover": ["train", "recover", model, *option],
        "data score": ["data", "score", data, "--score", "random", *option],
        "tokens eval": ["tokens", "eval", "fashion-vit", *option],
        "export": ["export", model, *option],
    }


@pytest.mark.parametrize("value", ["0", "-2"])
@pytest.mark.parametrize("command", ["prune", "shrink", "train fashion-mnist", "train recover", "data score",
                                     "tokens eval"])
def test_threads_must_be_positive_in_every_command(command, value, tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = _commands(str(tiny_model_dir), str(csv_data), ["--threads", value, "--out", str(out)])[command]
    assert main(args) == 2
    assert _line(capsys) == f"error: --threads must be a positive integer, got {value}"
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("command", ["prune", "data score"])
@pytest.mark.parametrize("device,message", [
    ("tpu", "--device must be cpu or cuda (cuda:N for one GPU of several), got 'tpu'"),
    ("cuda", "--device cuda: no CUDA GPU is available here"),
])
def test_unusable_devices_are_refused_in_one_line(command, device, message, tiny_model_dir, csv_data, tmp_path,
                                                  capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    args = _commands(str(tiny_model_dir), str(csv_data), ["--device", device, "--out", str(out)])[command]
    assert main(args) == 2
    assert _line(capsys).startswith(f"error: {message}")
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("command", ["prune", "shrink", "train fashion-mnist", "data score", "tokens eval", "export"])
def test_an_output_nothing_can_be_written_to_is_refused_in_one_line(command, tiny_model_dir, csv_data, capsys):
    args = _commands(str(tiny_model_dir), str(csv_data), ["--out", "/proc/x"])[command]
    assert main(args) == 2
    assert _line(capsys).startswith("error: cannot write /proc/x")


# ------------------------------------------------------------------------------------ Ctrl-C

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command,target", [
    ("prune", "prunekit.weights.job._load"),
    ("shrink", "prunekit.structure.job.load_model"),
    ("train fashion-mnist", "prunekit.training.vision_job.load_data"),
    ("train recover", "prunekit.models.loading.load_model"),
    ("data score", "prunekit.data.job.score_data"),
    ("tokens eval", "prunekit.models.loading.load_model"),
    ("export", "prunekit.models.export.load_model"),
])
def test_ctrl_c_says_that_nothing_was_written(command, target, monkeypatch, tiny_model_dir, csv_data, tmp_path,
                                              capsys):
    monkeypatch.setattr(target, _interrupt)
    out = tmp_path / "out"
    assert main(_commands(str(tiny_model_dir), str(csv_data), ["--out", str(out)])[command]) == 130
    assert _line(capsys) == f"interrupted; nothing was written to {out}"
    _no_leftovers(tmp_path, out)
    assert held_outputs() == []


def test_ctrl_c_in_a_streamed_run_says_what_was_kept_and_how_to_continue(monkeypatch, tiny_model_dir, tmp_path,
                                                                         capsys):
    from prunekit.weights import streaming

    def interrupt_after_block_0(point, block=None):
        if (point, block) == ("committed", 0):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    command = ["prune", str(tiny_model_dir), *STREAM, "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "_fault", interrupt_after_block_0)
        assert main(command) == 130
    assert _line(capsys) == (f"interrupted: block 0 kept in {partial_dir(out)}; rerun the same command with "
                             "--resume to continue")
    assert not out.exists() and not lock_file_of(out).exists() and not lock_file_of(partial_dir(out)).exists()
    assert main([*command, "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["resumed_from_block"] == 1


# --------------------------------------------------------------------------------- full disk

def test_too_little_disk_is_refused_before_any_work(monkeypatch, tiny_model_dir, tmp_path, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    monkeypatch.setattr("prunekit.weights.job._load", lambda *a, **k: pytest.fail("prune loaded the model"))
    monkeypatch.setattr("prunekit.structure.job.load_model", lambda *a, **k: pytest.fail("shrink loaded the model"))
    for command in ("prune", "shrink"):
        out = tmp_path / command
        assert main([command, str(tiny_model_dir), "--out", str(out)]) == 2
        line = _line(capsys)
        assert line.startswith(f"error: not enough disk space for {out}") and "GiB free" in line, line
        _no_leftovers(tmp_path, out)


def test_a_full_disk_while_saving_is_one_line_and_nothing_is_half_written(monkeypatch, tiny_model_dir, tmp_path,
                                                                         capsys):
    def disk_full(model, directory, tokenizer=None):
        (directory / "model.safetensors").write_bytes(b"\0" * 1000)  # half a model, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("prunekit.weights.job.write_dense", disk_full)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), *FAST, "--out", str(out)]) == 2
    assert _line(capsys) == (f"error: no space left on the device while writing {out}; nothing was written "
                             "(free some space and run again)")
    _no_leftovers(tmp_path, out)


def test_a_full_disk_in_a_streamed_run_keeps_the_blocks_done(monkeypatch, tiny_model_dir, tmp_path, capsys):
    from prunekit.weights import streaming

    real = streaming._write_shards
    calls = []

    def disk_full_at_block_1(work, index, *args):
        calls.append(index)
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(work / "model-00002-of-00003.safetensors"))
        real(work, index, *args)

    monkeypatch.setattr(streaming, "_write_shards", disk_full_at_block_1)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), *STREAM, "--out", str(out)]) == 2
    line = _line(capsys)
    assert line == (f"error: no space left on the device while writing {partial_dir(out)}; free some space: "
                    f"block 0 kept in {partial_dir(out)}; rerun the same command with --resume to continue"), line


# ---------------------------------------------------------------- one writer, temporaries, modes

# A streamed prune that stops, holding its output, after its first block until a file appears.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from prunekit.cli import main
from prunekit.weights import streaming

paused, go = Path(sys.argv[1]), Path(sys.argv[2])

def pause(point, block=None):
    if (point, block) == ("committed", 0):
        paused.touch()
        while not go.exists():
            time.sleep(0.05)

streaming._fault = pause
sys.exit(main(sys.argv[3:]))
"""


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_runs_on_one_output_the_second_refuses_and_the_first_is_intact(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    command = ["prune", str(tiny_model_dir), *STREAM, "--overwrite", "--out", str(out)]
    assert main(command) == 0
    before = _tree(out)
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(paused), str(go), *command],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not paused.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached its first block"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "prunekit", *command], capture_output=True, text=True,
                                timeout=240)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == (f"error: another prunekit run (pid {first.pid}) is writing {out}; "
                                                "wait for it to finish, or choose another --out"), second.stderr
        assert _tree(out) == before  # the refused run touched nothing
        go.touch()
        assert first.wait(timeout=240) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The first run's output is whole: its compressed copy decodes to its dense weights, nothing stray in it.
    import prunekit
    from prunekit.io.shards import ShardedCheckpoint

    compressed = prunekit.load(out / "compressed").state_dict()
    dense = ShardedCheckpoint(out)
    for name in dense.names():
        assert torch.equal(dense.get(name), compressed[name]), name
    assert not [p for p in out.rglob(".*")], "a scratch file was left inside the output"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_outputs_are_readable_like_any_file_and_dead_runs_temporaries_go(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-5f3a9c1e"  # what a run killed with -9 left
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2**20)
    previous = os.umask(0o022)
    try:
        assert main(["prune", str(tiny_model_dir), *FAST, "--out", str(out)]) == 0
        streamed = tmp_path / "streamed"
        assert main(["prune", str(tiny_model_dir), *STREAM, "--out", str(streamed)]) == 0
    finally:
        os.umask(previous)
    assert not stale.exists()
    assert f"removed 1 temporary of interrupted runs beside {out} (1.0 MiB)" in " ".join(
        capsys.readouterr().err.split())
    for root in (out, streamed):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"

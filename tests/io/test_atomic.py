"""The output contract of io/atomic.py: one writer per output, temporaries of dead runs cleared (and
only theirs), outputs with the umask's permissions, a full disk refused before the work or reported in
one line during it, nothing half-written either way."""

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.io.atomic import (
    atomic_directory,
    check_output_dir,
    remove_stale_temporaries,
    scratch_path,
    write_text,
)
from prunekit.io.lock import OWNER_FILE, held_outputs, is_owned_by_a_live_run, lock_file_of, unlock_all_outputs

# A run that takes an output and keeps it until told to go on (a line on stdin), as a long job would.
HOLDER = """
import sys
from pathlib import Path
from prunekit.io.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1]), overwrite=True) as tmp:
    (tmp / "payload.txt").write_text("written by the holder")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


@pytest.fixture(autouse=True)
def _no_locks_left():
    yield
    unlock_all_outputs()  # a test that fails halfway must not hold an output for the next one


@pytest.fixture()
def holder(tmp_path):
    """Start a holder of ``tmp_path / out``; returns (process, its temporary directory)."""
    started = []

    def start(out: Path):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        line = process.stdout.readline().strip()
        assert line, process.stderr.read()
        return process, Path(line)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------------------ locking

def test_a_second_writer_is_refused_while_the_first_writes(tmp_path, holder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the previous output")
    process, tmp = holder(out)
    with pytest.raises(PrunekitError, match=rf"another prunekit run \(pid {process.pid}\) is writing .*out; "
                                            "wait for it to finish, or choose another --out"):
        check_output_dir(out, overwrite=True)
    with pytest.raises(PrunekitError, match="another prunekit run"):
        with atomic_directory(out, overwrite=True):
            pytest.fail("the block of a refused writer ran")
    assert (out / "previous.txt").exists() and tmp.exists()  # the refusal touched nothing
    process.communicate("\n", timeout=60)
    assert process.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["payload.txt"]  # the holder's output, whole
    assert not lock_file_of(out).exists()  # let go and removed by its holder
    check_output_dir(out, overwrite=True)  # free again


def test_the_lock_of_a_killed_run_is_free(tmp_path, holder):
    out = tmp_path / "out"
    process, _tmp = holder(out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert lock_file_of(out).exists()  # kill -9 leaves the file, but the kernel let go of the lock
    assert check_output_dir(out, overwrite=False) == out.resolve()
    assert out.resolve() in held_outputs()


def test_locks_are_reentrant_within_a_process_and_let_go_after_the_write(tmp_path):
    out = tmp_path / "out"
    check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=False)  # the same job asking twice is not a second writer
    with atomic_directory(out) as tmp:
        write_text(tmp / "a.txt", "a")
    assert out.resolve() not in held_outputs() and not lock_file_of(out).exists()


def test_an_output_whose_parent_takes_no_files_is_refused_in_one_line():
    # os.access says yes to root in /proc; creating the lock file is the real test.
    with pytest.raises(PrunekitError, match=r"cannot write /proc/x"):
        check_output_dir("/proc/x", overwrite=False)


# ------------------------------------------------------------------------------ temporaries

def test_temporaries_of_killed_runs_are_removed_and_said_so(tmp_path, holder, capsys):
    out = tmp_path / "out"
    process, tmp = holder(out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp / OWNER_FILE).exists() and not is_owned_by_a_live_run(tmp)
    legacy = tmp_path / ".out.tmp-abc123"  # from a version without owner files
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"\0" * 2**20)
    unrelated = [tmp_path / ".other.tmp-1", tmp_path / ".out.partial.new-1", tmp_path / ".out.keep"]
    for path in unrelated:
        path.mkdir()
    capsys.readouterr()
    check_output_dir(out, overwrite=False)
    assert not tmp.exists() and not legacy.exists()
    assert all(path.exists() for path in unrelated)  # another output's, or not prunekit's
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("removed 2 temporaries of interrupted runs beside") and "MiB" in line


def test_a_live_runs_temporary_is_never_touched(tmp_path, holder):
    out = tmp_path / "out"
    process, tmp = holder(out)
    assert is_owned_by_a_live_run(tmp)
    remove_stale_temporaries(out.resolve())  # as a cleaner that did not hold the lock would
    assert (tmp / "payload.txt").exists()
    process.communicate("\n", timeout=60)
    assert (out / "payload.txt").exists()


def test_an_output_moved_aside_by_a_killed_replacement_is_put_back(tmp_path, capsys):
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-1a2b3c4d"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "weights.bin").write_text("the user's previous output")
    # Put back before the output is looked at: without --overwrite the run is then refused at once.
    with pytest.raises(PrunekitError, match="already exists; pass --overwrite"):
        check_output_dir(out, overwrite=False)
    assert (out / "weights.bin").read_text() == "the user's previous output" and not aside.exists()
    assert "put back the previous out" in _one_line(capsys.readouterr().err)


def test_scratch_names_are_unique_per_write(tmp_path):
    target = tmp_path / "model.safetensors"
    names = {scratch_path(target, "data") for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith(f".model.safetensors.data-{os.getpid()}-") for n in names)


def test_a_failed_tensor_write_leaves_no_scratch_file(tmp_path, monkeypatch):
    from prunekit.io import safetensors_file

    def disk_full(handle, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_file, "_write_bytes", disk_full)
    with pytest.raises(OSError):
        safetensors_file.write_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(4)})
    with pytest.raises(OSError):
        safetensors_file.write_safetensors_one_by_one(tmp_path / "b.safetensors", iter([("w", torch.ones(4))]))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ permissions

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umasks_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        with atomic_directory(out) as tmp:
            write_text(tmp / "report.md", "# report")  # through mkstemp, private until now
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"\0")
            os.chmod(tmp / "sub" / "weights.bin", 0o600)  # as a library writing through mkstemp leaves it
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o777 & ~umask and mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "report.md") == 0o666 & ~umask and mode(out / "sub" / "weights.bin") == 0o666 & ~umask


def test_atomic_file_gets_the_umasks_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "state.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------- full disk

def test_too_little_free_space_is_refused_before_the_work(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(PrunekitError, match=r"not enough disk space for .*out: 0.02 GiB needed, 0.01 GiB free"):
        check_output_dir(tmp_path / "out", overwrite=False, expected_bytes=20 * 2**20)
    check_output_dir(tmp_path / "fits", overwrite=False, expected_bytes=lambda: 5 * 2**20)
    # The estimate is computed only once the cheap checks pass (it may read a whole model's headers).
    (tmp_path / "exists").mkdir()
    with pytest.raises(PrunekitError, match="already exists"):
        check_output_dir(tmp_path / "exists", overwrite=False, expected_bytes=lambda: pytest.fail("estimated"))


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(PrunekitError, match=r"no space left on the device while writing .*out; nothing was "
                                            r"written \(free some space and run again\)"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no lock file
    assert (out / "previous.txt").read_text() == "kept"


def test_a_full_disk_reported_by_a_library_in_its_own_words_is_recognised(tmp_path):
    with pytest.raises(PrunekitError, match="no space left"):
        with atomic_directory(tmp_path / "out"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as cause:  # safetensors and torch.save wrap it
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos") from cause
    with pytest.raises(PrunekitError, match="no space left"):
        with atomic_directory(tmp_path / "out"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")

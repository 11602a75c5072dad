"""One writer per output, and temporaries that say whether their writer still lives.

Output locks: a run that writes ``DIR/NAME`` holds an exclusive ``flock`` on ``DIR/.NAME.lock`` from
its first check of the output until the output is in place. ``flock`` is released by the kernel
when the process ends, however it ends (kill -9 included), so a lock is never left held by a dead
run; the file itself is removed by the holder when it lets go. A second run asking for the same
output is refused at once instead of waiting: two runs writing one output is a mistake to report,
and a run that waited hours for another would surprise its user just as much.

Within one process the locks are re-entrant (the check at the start of a job and the write at its
end both ask for the lock; the second ask is free), and ``unlock_output`` lets go of it whoever
took it. Under ``torchrun`` only rank 0 writes, so only rank 0 locks (see ``is_writer_process``).

Owner files: every temporary directory a run writes an output into holds ``.prunekit-owner``,
``flock``-ed by the writer while it lives. A later run can then tell a dead run's leftovers (the
lock is free) from a live run's work in progress (the lock is held), whatever the pids are now.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import PrunekitError

OWNER_FILE = ".prunekit-owner"
# How often to retry when the lock file is replaced under us (a holder removing it as it lets go).
_LOCK_ATTEMPTS = 20


@dataclass
class _HeldLock:
    output: Path
    lock_file: Path
    fd: int


_held_outputs: dict[Path, _HeldLock] = {}
_owned_temporaries: dict[Path, int] = {}


def is_writer_process() -> bool:
    """False in the non-writing ranks of a ``torchrun`` job: they read the output's path but never write it."""
    return os.environ.get("RANK", "0") in ("", "0")


def lock_file_of(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def lock_output(output: str | os.PathLike) -> bool:
    """Take the exclusive lock on ``output``; True when this call took it, False when this process held it already.

    Raises ``PrunekitError`` in one line when another process holds it, or when the output's
    parent cannot take a file at all (read-only, ``/proc``, ...).
    """
    output = Path(output)
    if output in _held_outputs:
        return False
    lock_file = lock_file_of(output)
    for _ in range(_LOCK_ATTEMPTS):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise PrunekitError(f"cannot write {output}: cannot create a file in {output.parent} "
                                f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                # A file system without flock: nothing can be locked there, as for any other tool.
                os.close(fd)
                return False
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another prunekit run (pid {holder})" if holder else "another prunekit run"
            raise PrunekitError(f"{who} is writing {output}; wait for it to finish, or choose another --out") from None
        # The previous holder removes the file as it lets go; if it did so after we opened it, we
        # hold a lock on a file nobody else will open. Then start again with the current file.
        try:
            current = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held_outputs[output] = _HeldLock(output, lock_file, fd)
            return True
        os.close(fd)
    raise PrunekitError(f"cannot lock {output}: its lock file {lock_file} keeps being replaced")


def unlock_output(output: str | os.PathLike) -> None:
    held = _held_outputs.pop(Path(output), None)
    if held is None:
        return
    # Removed while still locked, so no other run can take the lock on a file about to vanish.
    try:
        os.unlink(held.lock_file)
    except OSError:
        pass
    os.close(held.fd)


def held_outputs() -> list[Path]:
    return list(_held_outputs)


def unlock_all_outputs() -> None:
    for output in list(_held_outputs):
        unlock_output(output)
    for directory in list(_owned_temporaries):
        disown_temporary(directory)


def own_temporary(directory: Path) -> None:
    """Mark ``directory`` as this live process's work in progress (see ``is_owned_by_a_live_run``)."""
    fd = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no flock here: the output lock alone keeps other runs away
    os.write(fd, f"{os.getpid()}\n".encode())
    _owned_temporaries[directory] = fd


def disown_temporary(directory: Path) -> None:
    """Before the rename: the owner file must not become part of the output."""
    fd = _owned_temporaries.pop(directory, None)
    try:
        os.unlink(directory / OWNER_FILE)
    except OSError:
        pass
    if fd is not None:
        os.close(fd)


def is_owned_by_a_live_run(directory: Path) -> bool:
    owner = directory / OWNER_FILE
    if directory in _owned_temporaries:
        return True
    try:
        fd = os.open(owner, os.O_RDONLY)
    except OSError:
        return False  # no owner file: written before owner files existed, or killed while being created
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
    finally:
        os.close(fd)
    return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None

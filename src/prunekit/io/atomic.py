"""The output contract every command gets by writing through this module.

An output directory appears whole or not at all, and one run at a time writes it:

1. ``check_output_dir`` (before any work): the output is not an input, is refused if it exists
   without ``overwrite``, its parent takes files, and ``expected_bytes`` fit on the disk. It takes
   the output's lock (``io/lock.py``), so a second run on the same output is refused at once, and
   removes the temporaries that dead runs left beside it (saying so in one line).
2. ``atomic_directory`` (the write): a temporary sibling ``.NAME.tmp-*`` with the permissions the
   umask gives any new directory, marked as this live run's by an owner file; it replaces the output
   by a rename only if the block succeeds, and is removed if it fails. A full disk while writing is
   one line (``PrunekitError``), with nothing half-written left. The lock is let go at the end.

A job that writes its output in place over a long time (``weights/streaming.py``) holds the lock
with ``writing_output``, declaring what an interruption would leave behind; the CLI tells the user.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from prunekit.errors import PrunekitError
from prunekit.io.lock import (
    disown_temporary,
    is_owned_by_a_live_run,
    is_writer_process,
    lock_output,
    own_temporary,
    unlock_output,
)

# Hidden siblings of ``NAME`` that prunekit creates while writing it: ``.NAME.<kind>-<unique>``.
# tmp: atomic_directory's temporary; old: the previous output being replaced; new/trash: the
# streamed run's partial directory being created or removed.
TEMPORARY_KINDS = ("tmp", "old", "new", "trash")
# Attribute an exception leaving ``writing_output`` carries: what the interrupted job left behind.
KEPT_ATTRIBUTE = "prunekit_kept"

ExpectedBytes = int | Callable[[], int] | None


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike | None, ...] = (),
                     *, expected_bytes: ExpectedBytes = None) -> Path:
    """Validate an output directory before any work starts, so a run never fails at the very end.

    ``expected_bytes`` (a number, or a function computed only once the cheaper checks pass) is what
    the job will write; a disk with less free space is refused now rather than after the work.
    """
    out_path = Path(out).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if out_path == src:
            raise PrunekitError(f"output directory {out} is the input itself; choose another --out")
        if src.is_dir() and src in out_path.parents:
            raise PrunekitError(f"output directory {out} lies inside the input {source}; choose another --out")
        if out_path in src.parents:
            raise PrunekitError(f"output directory {out} contains the input {source}; choose another --out")
    parent = out_path.parent
    if not parent.exists():
        raise PrunekitError(f"cannot write {out}: parent directory {parent} does not exist")
    if not parent.is_dir():
        raise PrunekitError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise PrunekitError(f"cannot write {out}: parent directory {parent} is not writable")
    if is_writer_process():
        # Creating the lock file is also the real test of the parent: os.access says yes to root
        # even where no file can be made (/proc, a read-only mount). Taken before looking at the
        # output itself, which the clean-up of a killed replacement may put back.
        take_output(out_path)
    if out_path.exists():
        if not overwrite:
            raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
        if not out_path.is_dir():
            raise PrunekitError(f"output {out} exists and is not a directory")
    if expected_bytes is not None:
        check_free_space(out_path, expected_bytes() if callable(expected_bytes) else expected_bytes)
    return out_path


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Refuse to start a job whose output would not fit on the disk that will hold it."""
    directory = out.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise PrunekitError(f"not enough disk space for {out}: {needed_bytes / 2**30:.2f} GiB needed, "
                            f"{free / 2**30:.2f} GiB free")


def take_output(out: Path) -> None:
    """Lock ``out`` for this process; on first taking it, clear what dead runs left beside it."""
    if lock_output(out):
        remove_stale_temporaries(out)


@contextlib.contextmanager
def writing_output(out: str | os.PathLike, keeps: Callable[[], str | None] | None = None) -> Iterator[Path]:
    """Hold ``out``'s lock for the block, for a job that writes it in place.

    ``keeps`` says, when asked, what the job has left on disk that a later run can continue from
    (``"blocks 0..4 kept in X.partial; rerun ... --resume"``), or None when nothing; an exception
    leaving the block carries that note (``kept_notes``) to the CLI, which prints it.
    """
    out_path = Path(out).expanduser().resolve()
    take_output(out_path)
    try:
        yield out_path
    except BaseException as exc:
        note = keeps() if keeps is not None else None
        if note:
            _attach_kept(exc, note)
        raise
    finally:
        unlock_output(out_path)


def kept_notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, KEPT_ATTRIBUTE, []) or [])


def _attach_kept(exc: BaseException, note: str) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # an exception type without attributes
        setattr(exc, KEPT_ATTRIBUTE, [*kept_notes(exc), note])


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False, *,
                     expected_bytes: ExpectedBytes = None) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out`` only if the block succeeds."""
    out_path = Path(out).expanduser().resolve()
    take_output(out_path)
    try:
        if out_path.exists() and not overwrite:
            raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
        if expected_bytes is not None:
            check_free_space(out_path, expected_bytes() if callable(expected_bytes) else expected_bytes)
        try:
            tmp = make_temporary_dir(out_path.parent, f".{out_path.name}.tmp-")
        except OSError as exc:
            raise PrunekitError(f"cannot write {out}: {exc.strerror or exc}") from None
        own_temporary(tmp)
        try:
            yield tmp
            disown_temporary(tmp)
            replace_directory(tmp, out_path)
        except BaseException as exc:
            disown_temporary(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise PrunekitError(f"no space left on the device while writing {out}; nothing was written "
                                    "(free some space and run again)") from None
            raise
    finally:
        unlock_output(out_path)


def is_disk_full(exc: BaseException) -> bool:
    """An exception (or one it was raised from) saying the disk or the quota is full.

    Libraries report it in their own words: ``OSError(ENOSPC)`` from Python, ``... (os error 28)``
    from Rust (safetensors), a ``RuntimeError`` quoting the C library from torch.save.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def make_temporary_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named directory with the umask's permissions.

    Not ``tempfile.mkdtemp``: its directories are private (0700), and renamed into place they made
    every output readable by its owner only.
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)  # the umask applies, as for any directory a tool creates
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot find a free temporary name {prefix}* in {parent}")


def scratch_path(target: Path, kind: str = "tmp") -> Path:
    """A name beside ``target`` for a file written before it becomes ``target``, unique to this write.

    Unique (pid and a random part) so that two writers can never interleave in one scratch file.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def umask_file_mode() -> int:
    """The mode a file created now gets (0o666 without the umask's bits)."""
    return 0o666 & ~_umask()


def give_umask_permissions(directory: Path) -> None:
    """Give ``directory`` and everything in it the permissions a new file or directory gets here.

    What writes an output does not always honour the umask (``mkstemp`` makes private files, some
    libraries write through it, ``copy2`` copies the source's mode); an output is meant to be as
    readable as anything else the user creates. Executable bits already set stay set.
    """
    umask = _umask()
    directory_mode = 0o777 & ~umask
    os.chmod(directory, directory_mode)
    for root, directories, files in os.walk(directory):
        for name in directories:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), directory_mode, follow_symlinks=False)
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.path.islink(path):
                    continue
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def remove_stale_temporaries(out: Path) -> None:
    """Remove what dead runs left beside ``out``; call only while holding ``out``'s lock.

    Holding the lock, no other live run of this version can be writing ``out``, so its temporaries
    are leftovers of killed runs; an owner file still locked by a live process (a run that somehow
    writes without the lock) keeps its directory all the same. A previous output moved aside by a
    replacement that was killed halfway is put back first: nothing the user had is lost.
    """
    from prunekit.core.progress import console

    prefix = f".{out.name}."
    leftovers = []
    for path in sorted(out.parent.glob(glob.escape(prefix) + "*")):
        kind, dash, _unique = path.name[len(prefix):].partition("-")
        if not dash or kind not in TEMPORARY_KINDS or is_owned_by_a_live_run(path):
            continue
        leftovers.append((kind, path))
    if not leftovers:
        return
    restored = None
    for kind, path in leftovers:
        previous = path / out.name
        if kind == "old" and not out.exists() and not out.is_symlink() and previous.exists():
            os.replace(previous, out)
            restored = path
    removed = 0
    freed = 0
    for _kind, path in leftovers:
        freed += _size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed += 1
    message = (f"removed {removed} temporar{'y' if removed == 1 else 'ies'} of interrupted runs beside {out} "
               f"({freed / 2**20:.1f} MiB)")
    if restored is not None:
        message += f"; put back the previous {out.name} a killed replacement had moved aside"
    console.print(message, highlight=False, soft_wrap=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        with contextlib.suppress(OSError):
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
    return total


def replace_directory(new: Path, target: Path) -> None:
    """Put the finished ``new`` in ``target``'s place, by renames only (``target`` may exist)."""
    give_umask_permissions(new)
    if target.exists():
        trash = make_temporary_dir(target.parent, f".{target.name}.old-")
        os.replace(target, trash / target.name)
        os.replace(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path``; it replaces ``path`` when the block succeeds."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent or ".")
    # mkstemp's files are private (0600); the file gets what the umask gives any new file.
    os.fchmod(fd, umask_file_mode())
    os.close(fd)
    try:
        with open(tmp_name, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def directory_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())

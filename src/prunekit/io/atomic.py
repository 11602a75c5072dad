"""Outputs appear whole or not at all: everything is written to a temporary sibling, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from prunekit.errors import PrunekitError


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Validate an output directory before any work starts, so a run never fails at the very end."""
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
    if out_path.exists():
        if not overwrite:
            raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
        if not out_path.is_dir():
            raise PrunekitError(f"output {out} exists and is not a directory")
    parent = out_path.parent
    if not parent.exists():
        raise PrunekitError(f"cannot write {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PrunekitError(f"cannot write {out}: parent directory {parent} is not writable")
    return out_path


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out`` only if the block succeeds."""
    out_path = Path(out).expanduser().resolve()
    if out_path.exists() and not overwrite:
        raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out_path)


def replace_directory(new: Path, target: Path) -> None:
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
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

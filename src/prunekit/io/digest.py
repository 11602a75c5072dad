"""Content digests of model files, computed once per file version and remembered in the user cache.

A 3.5 B-parameter checkpoint is several GiB: hashing it costs seconds, so a file's digest is kept under
the cache beside the file's identity (resolved path, size, modification time, inode) and reused until
one of them changes. A file in a Hugging Face hub cache (``.../blobs/<digest>``) is named by its content
already, and costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from prunekit.core.cache import cache_dir
from prunekit.io.atomic import write_text

_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (or the hub's own digest of them), hashed once per file version."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        return f"hub:{real.name}"
    stat = real.stat()
    identity = {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    memo = cache_dir("digests") / f"{hashlib.sha256(str(real).encode()).hexdigest()}.json"
    try:
        remembered = json.loads(memo.read_text())
        if remembered.get("identity") == identity:
            return remembered["digest"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    with open(real, "rb") as handle:
        digest = "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
    try:
        write_text(memo, json.dumps({"identity": identity, "digest": digest}))
    except OSError:
        pass  # a read-only cache only costs the hash again next time
    return digest


def directory_digest(directory: str | os.PathLike) -> str:
    """One digest over every file under ``directory`` (names and contents); hidden files (locks,
    temporaries) are left out."""
    root = Path(directory)
    combined = hashlib.sha256()
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for file in files:
        combined.update(f"{file.relative_to(root).as_posix()}\0{file_digest(file)}\n".encode())
    return combined.hexdigest()


def tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

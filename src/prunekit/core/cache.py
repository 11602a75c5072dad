"""Where prunekit keeps what it builds once and reuses (dequantized models, tokenized corpora)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$PRUNEKIT_CACHE``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``."""
    root = os.environ.get("PRUNEKIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "prunekit") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "prunekit")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

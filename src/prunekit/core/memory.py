"""Give freed heap memory back to the operating system between calibration steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """glibc keeps freed activations of one block in its arenas, and the next block's peak then
    stacks on top of them; trimming after each block bounds the resident size by what is alive."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

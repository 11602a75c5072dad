"""Report helpers shared by every job: JSON and Markdown written atomically, readable numbers."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Sequence

from prunekit.io.atomic import write_text

SPEED_NOTE = ("Unstructured and N:M masks do not speed up dense CPU kernels: the weight matrices stay dense in "
              "memory and every multiply still happens, so inference runs no faster after this pruning. The gain "
              "is size on disk (the compressed copy) and quality per parameter. 2:4 sparsity can be accelerated by "
              "sparse tensor cores on GPUs that support it (NVIDIA Ampere and later); on CPUs only structured "
              "pruning (removing whole channels, heads or blocks) makes inference faster.")


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:  # the installed distribution's version: importing the package root would import every dimension
        prunekit_version = version("prunekit")
    except PackageNotFoundError:
        prunekit_version = "unknown (not installed)"
    return {"prunekit": prunekit_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"

"""The CLI's promise, in one place: what every command checks, and how every ending is told.

Endings (``docs/DEVELOPING.md``, "The CLI contract"): 0 done; 2 the user's to fix (a bad option, a
bad input, a full disk, an output another run holds), told in one line starting ``error:``; 130
interrupted, told in one line saying what was kept and how to continue; 1 a bug in prunekit, one
line too (``PRUNEKIT_DEBUG=1`` shows the traceback).

Options that mean the same thing in several commands are checked here, with one rule and one
message each, so that ``--threads 0`` is refused alike by every command.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

from prunekit.errors import PrunekitError
from prunekit.io.atomic import is_disk_full, kept_notes
from prunekit.io.lock import held_outputs


# --------------------------------------------------------------------------------- shared options

def check_threads(threads: int | None) -> int | None:
    """``--threads``: a positive number of CPU threads, or None for torch's choice."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"--threads must be a positive integer, got {threads}")
    return threads


def apply_threads(threads: int | None) -> None:
    """Check ``--threads`` and give torch that many threads (nothing when it is not given)."""
    if check_threads(threads) is not None:
        import torch

        torch.set_num_threads(threads)


_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def check_device(device: str | None, option: str = "--device") -> str | None:
    """``--device``: cpu, cuda[:N] (a GPU this machine has) or mps; refused in one line otherwise."""
    if device is None:
        return None
    match = _DEVICE.fullmatch(str(device).strip().lower())
    if match is None:
        raise PrunekitError(f"{option} must be cpu or cuda (cuda:N for one GPU of several), got '{device}'")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return device
    import torch

    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise PrunekitError(f"{option} {device}: this machine has no Apple GPU (mps); use --device cpu")
        return device
    if not torch.cuda.is_available():
        raise PrunekitError(f"{option} {device}: no CUDA GPU is available here (torch {torch.__version__}, "
                            f"{'built without CUDA' if torch.version.cuda is None else 'no device found'}); "
                            "use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise PrunekitError(f"{option} {device}: this machine has {count} GPU{'s' if count != 1 else ''} "
                            f"(cuda:0..cuda:{count - 1})")
    return device


# ------------------------------------------------------------------------------------- endings

def click_modules() -> list[ModuleType]:
    """Where the parser's exceptions come from: typer 0.29 ships its own click (``typer._click``) and
    raises its classes; older typer raises those of the separately installed click. Both are
    handled, whichever is present (``pyproject.toml`` bounds typer to the releases tested)."""
    modules = []
    for name in ("typer._click", "click"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return modules


def _exception_classes(name: str) -> tuple[type, ...]:
    """The classes called ``name`` in every place the parser may raise from (typer 0.29 keeps Exit
    and Abort in ``typer.exceptions``, the rest in ``typer._click.exceptions``)."""
    found: list[type] = []
    for place in [f"{module.__name__}.exceptions" for module in click_modules()] + ["typer.exceptions"]:
        try:
            cls = getattr(importlib.import_module(place), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


USAGE_ERRORS = _exception_classes("ClickException")  # bad options, values, commands (UsageError & co.)
NO_ARGS_HELP = _exception_classes("NoArgsIsHelpError")  # a command group given no command: its help
EXITS = _exception_classes("Exit")  # --help and the like: a normal exit with a code
ABORTS = _exception_classes("Abort")  # a prompt cut short (Ctrl-C or Ctrl-D): an interruption


def usage_message(exc: BaseException) -> str:
    """A parser error in one line, with where to read about the command."""
    format_message = getattr(exc, "format_message", None)
    text = format_message() if callable(format_message) else str(exc)
    text = " ".join(str(text).split())
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    return f"{text} (see `{command} --help`)" if command else text


def interrupted_message(exc: BaseException) -> str:
    """What an interruption kept and how to continue, in one line."""
    notes = kept_notes(exc)
    if notes:
        return "interrupted: " + "; ".join(notes)
    outputs = held_outputs()
    if outputs:
        return "interrupted; nothing was written to " + ", ".join(str(path) for path in outputs)
    return "interrupted; nothing was written"


def disk_full_message(exc: BaseException) -> str | None:
    """A full disk the job did not report itself (a write outside ``atomic_directory``), or None."""
    if not is_disk_full(exc):
        return None
    notes = kept_notes(exc)
    where = getattr(exc, "filename", None)
    text = f"no space left on the device{f' while writing {Path(where).parent}' if where else ''}"
    if notes:
        return f"{text}; free some space: " + "; ".join(notes)
    return f"{text}; nothing was written (free some space and run again)"

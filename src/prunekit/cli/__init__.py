"""The ``prunekit`` command: a thin typer app over the Python API.

Each module of this package adds its commands to ``prunekit.cli.app.app``; ``main`` turns
user errors into one line and a non-zero exit.
"""

from __future__ import annotations

import os
import sys

import click

from prunekit.cli.app import app
from prunekit.core.registry import import_submodules
from prunekit.errors import PrunekitError

import_submodules("prunekit.cli")


def main(argv: list[str] | None = None) -> int:
    from prunekit.core.progress import console

    _quiet_libraries()
    try:
        result = app(args=argv, prog_name="prunekit", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        console.print("aborted")
        return 130
    except PrunekitError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written")
        return 130
    except Exception as exc:  # a bug in prunekit: still one line unless asked for the traceback
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        text = str(exc).strip().splitlines()
        console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {text[0] if text else ''} "
                      "(set PRUNEKIT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1


def _quiet_libraries() -> None:
    """The CLI draws its own progress; the libraries' bars and advice would interleave with it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run() -> None:
    sys.exit(main())

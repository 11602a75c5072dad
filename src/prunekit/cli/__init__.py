"""The ``prunekit`` command: a thin typer app over the Python API.

Each module of this package adds its commands to ``prunekit.cli.app.app``; ``main`` keeps the CLI's
promise for all of them (``cli/contract.py``): every ending is one line and an exit code, 0 done,
2 for what the user can fix, 130 interrupted (saying what was kept), 1 a bug in prunekit.
"""

from __future__ import annotations

import os
import sys

from prunekit.cli import contract
from prunekit.cli.app import app
from prunekit.core.registry import import_submodules
from prunekit.errors import PrunekitError
from prunekit.io.lock import unlock_all_outputs

import_submodules("prunekit.cli")


def main(argv: list[str] | None = None) -> int:
    from prunekit.core.progress import console

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    _quiet_libraries()
    try:
        return _invoke(sys.argv[1:] if argv is None else list(argv))
    except contract.NO_ARGS_HELP as exc:  # `prunekit` or `prunekit data` alone: the help is the answer
        exc.show()
        return 0
    except contract.EXITS as exc:  # --help, or a command ending early on purpose
        return exc.exit_code
    except contract.USAGE_ERRORS as exc:  # a bad option, value or command: the parser's word, one line
        say(f"[bold red]error:[/bold red] {contract.usage_message(exc)}")
        return 2
    except PrunekitError as exc:
        say(f"[bold red]error:[/bold red] {exc}")
        return exc.exit_code
    except (KeyboardInterrupt, *contract.ABORTS) as exc:
        say(contract.interrupted_message(exc))
        return 130
    except Exception as exc:
        disk_full = contract.disk_full_message(exc)
        if disk_full is not None:
            say(f"[bold red]error:[/bold red] {disk_full}")
            return 2
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        # A bug in prunekit: still one line unless asked for the traceback.
        text = str(exc).strip().splitlines()
        say(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {text[0] if text else ''} "
            "(set PRUNEKIT_DEBUG=1 for the traceback)")
        return 1
    finally:
        # Outputs this command checked but never wrote (it failed or was interrupted between).
        unlock_all_outputs()


def _invoke(args: list[str]) -> int:
    """Parse and run one command, letting every exception through to ``main``.

    Not ``app(standalone_mode=False)``: typer's own handling turns Ctrl-C into a silent exit code 130
    before ``main`` could say what was kept, and prints parser errors over several lines.
    """
    import typer

    command = typer.main.get_command(app)
    with command.make_context("prunekit", args) as ctx:
        result = command.invoke(ctx)
    return result if isinstance(result, int) else 0


def _quiet_libraries() -> None:
    """The CLI draws its own progress; the libraries' bars and advice would interleave with it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run() -> None:
    sys.exit(main())

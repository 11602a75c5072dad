"""Run a benchmark's phases in order, each in a fresh process, skipping finished ones (resumable)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable


def phase_command(script: str | Path, arguments: list[str], lock: str | None) -> list[str]:
    command = [sys.executable, str(Path(script).resolve()), *arguments]
    return ["flock", lock, *command] if lock else command


def run_phases(script: str | Path, plan: Iterable[tuple[str, list[str]]], raw: Path, lock: str | None,
               report: Callable[[], None], needs_torch_pruning: bool = False) -> None:
    """Each phase writes ``raw/<name>.json``; a phase whose file exists is done. Then the report."""
    if needs_torch_pruning:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise SystemExit("Torch-Pruning is missing: pip install --no-deps torch-pruning==1.6.1") from None
    for name, arguments in plan:
        if (raw / f"{name}.json").exists():
            print(f"skip {name}: {raw / (name + '.json')} exists")
            continue
        command = phase_command(script, arguments, lock)
        print(f"run  {name}: {shlex.join(command)}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (exit code {done.returncode}); fix it and run 'all' again to resume")
    report()


def print_plan(script: str | Path, plan: Iterable[tuple[str, list[str]]], raw: Path) -> None:
    """Every phase, done or to do, with the command that runs it."""
    for name, arguments in plan:
        state = "done" if (raw / f"{name}.json").exists() else "todo"
        print(f"{state}  {name}: {shlex.join(phase_command(script, arguments, None)[1:])}")

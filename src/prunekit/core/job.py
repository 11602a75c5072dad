"""The shape every command shares: a recipe in, an outcome out.

A job is built from its recipe (a ``RecipeModel`` that round-trips to YAML), computes in ``run()``,
and writes what it made (the model, plots) into the output directory it is handed in ``write()``.
Running it, checking and locking the output, writing ``report.json``, ``report.md`` and
``recipe.yaml`` and renaming the result into place is the same for every job
(``prunekit.evaluate.outcome.execute``), so a new command gets all of it by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from prunekit.core.config import RecipeModel

RecipeT = TypeVar("RecipeT", bound=RecipeModel)


@dataclass
class Outcome:
    """What a job produced: its report as data and as Markdown, a short summary for the terminal,
    and (once written) the output directory and the files in it."""

    report: dict[str, Any]
    markdown: str = ""
    summary: list[tuple[str, str]] = field(default_factory=list)
    title: str = ""
    out_dir: Path | None = None
    files: list[str] = field(default_factory=list)


class Job(Generic[RecipeT]):
    """One command's work. Subclasses set ``command`` and ``recipe_type`` and implement ``run``/``write``."""

    command: ClassVar[str]
    recipe_type: ClassVar[type[RecipeModel]]
    # Jobs that write their output as they go (resumable streaming) manage their directory themselves.
    writes_as_it_goes: ClassVar[bool] = False
    # Whether the recipe's ``model`` names something the command reads (not, say, an architecture to train).
    reads_model: ClassVar[bool] = True

    def __init__(self, recipe: RecipeT):
        self.recipe = recipe
        # Under torchrun every process runs the job, and only the writer (process 0) writes.
        self.writer = True

    def inputs(self) -> tuple[str | None, ...]:
        """Paths the output must never be, lie inside or contain: by default the recipe's ``model`` (a directory
        or file the command reads), for the recipes whose model is one (``reads_model``)."""
        return (getattr(self.recipe, "model", None),) if self.reads_model else ()

    def expected_bytes(self) -> int | None:
        """About how much the output will take on disk, checked against the free space before any work."""
        return None

    def run(self) -> Outcome:
        raise NotImplementedError

    def run_into(self, out: Path, overwrite: bool) -> Outcome:
        """For jobs that write as they go: compute and write into ``out`` (checked and locked by the job)."""
        raise NotImplementedError

    def finished(self) -> None:
        """Called on every process once the writer has written (a torchrun group waits for it here)."""

    def write(self, directory: Path, outcome: Outcome) -> None:
        """Write the job's files (model, plots) into ``directory``; reports and the recipe are written after,
        so what writing finds (a file's name, its size) may still go into ``outcome``."""

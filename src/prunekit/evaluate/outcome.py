"""Running a job the same way for every command: check and lock the output, compute, write atomically."""

from __future__ import annotations

from pathlib import Path

from prunekit.core.job import Job, Outcome
from prunekit.evaluate.report import write_json
from prunekit.io.atomic import atomic_directory, check_output_dir, write_text

REPORT_JSON, REPORT_MD, RECIPE_YAML = "report.json", "report.md", "recipe.yaml"


def execute(job: Job, out: str | Path | None, overwrite: bool = False) -> Outcome:
    """Run ``job``; with ``out``, write its files, ``report.json``, ``report.md`` and ``recipe.yaml`` there.

    The output is checked (not an input, not existing unless ``overwrite``, room on the disk) and locked
    before any work, and appears whole or not at all.
    """
    if out is None:
        return job.run()
    if job.writes_as_it_goes:
        outcome = job.run_into(Path(out), overwrite)
        if outcome.out_dir is not None:
            outcome.files = sorted(p.name for p in outcome.out_dir.iterdir() if not p.name.startswith("."))
        job.finished()
        return outcome
    # Every process of a torchrun group checks alike (so all refuse together); only the writer writes.
    out_path = check_output_dir(out, overwrite, inputs=job.inputs(), expected_bytes=job.expected_bytes())
    outcome = job.run()
    if job.writer:
        with atomic_directory(out_path, overwrite) as tmp:
            job.write(tmp, outcome)
            write_outcome(tmp, outcome, job)
            files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        outcome.out_dir, outcome.files = out_path, files
    job.finished()
    return outcome


def write_outcome(directory: Path, outcome: Outcome, job: Job) -> None:
    """The three files every job writes: the report as data and as Markdown, and the recipe that reproduces it."""
    write_json(directory / REPORT_JSON, outcome.report)
    write_text(directory / REPORT_MD, outcome.markdown)
    write_text(directory / RECIPE_YAML, job.recipe.to_yaml())

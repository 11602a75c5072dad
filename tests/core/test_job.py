"""Every command's job protects what it reads: its output may never be, lie inside or contain the model it reads."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from prunekit.core.job import Job
from prunekit.errors import PrunekitError
from prunekit.io.atomic import check_output_dir

JOB_MODULES = ["prunekit.weights.job", "prunekit.structure.job", "prunekit.training.recovery",
               "prunekit.training.vision_job", "prunekit.models.export", "prunekit.tokens.job", "prunekit.kv.job",
               "prunekit.data.job"]


def _jobs() -> list[type[Job]]:
    for module in JOB_MODULES:
        importlib.import_module(module)
    found, stack = [], list(Job.__subclasses__())
    while stack:
        job = stack.pop()
        found.append(job)
        stack.extend(job.__subclasses__())
    return sorted({job for job in found if job.__module__ in JOB_MODULES}, key=lambda job: job.__qualname__)


def _model_readers() -> list[type[Job]]:
    return [job for job in _jobs() if "model" in job.recipe_type.model_fields and job.reads_model]


def test_every_command_job_is_found():
    names = {job.__name__ for job in _jobs()}
    assert {"PruneJob", "ShrinkJob", "RecoveryJob", "ExportJob", "TokensEvalJob", "KVEvalJob",
            "VisionTrainingJob"} <= names


@pytest.mark.parametrize("job_type", _model_readers(), ids=lambda job: job.__name__)
def test_the_model_read_is_an_input(job_type, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    job = job_type.__new__(job_type)  # no __init__: some set up process groups from the recipe
    job.recipe = job_type.recipe_type.model_construct(model=str(model_dir))
    assert str(model_dir) in job.inputs()
    with pytest.raises(PrunekitError):
        check_output_dir(model_dir / "pruned", overwrite=False, inputs=job.inputs())


def test_a_trained_architecture_is_no_input(tmp_path):
    from prunekit.training.vision_job import VisionTrainingJob

    job = VisionTrainingJob.__new__(VisionTrainingJob)
    job.recipe = VisionTrainingJob.recipe_type.model_construct(model="cnn")
    assert job.inputs() == ()
    check_output_dir(Path(tmp_path) / "cnn", overwrite=False, inputs=job.inputs())

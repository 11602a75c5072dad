"""A method written and registered here runs through the Fashion-MNIST job with no edit to the job:
the job reads what the method declares, never its name."""

from typing import Any, Mapping

import pytest
import torch
from pydantic import Field

from prunekit.errors import PrunekitError
from prunekit.models.fashion_mnist import ImageSet
from prunekit.training import SPARSIFIERS, Sparsifier, SparseTrainingMethod, TrainingRun
from prunekit.training.vision_job import VisionTrainingRecipe, build_model, run_vision, vision_markdown, vision_report


class StepwiseMethod(SparseTrainingMethod):
    """Prunes by magnitude in equal steps every ``every`` steps until ``end_step``; scores nothing on data,
    but records the batch it is given, to show the job provides what is declared."""

    needs = frozenset({"schedule", "data", "loss"})

    end_step: int = Field(ge=1)
    every: int = Field(1, ge=1)

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        return {"end_step": run.total_steps // 2, **given}


class Stepwise(Sparsifier):
    method_class = StepwiseMethod

    def __init__(self, model, sparsity, distribution=None, *, data=None, **common):
        self.first_batch = next(iter(data)) if data is not None else None
        super().__init__(model, sparsity, distribution, **common)

    def update(self) -> bool:
        method = self.method
        if self.steps > method.end_step or self.steps % method.every:
            return False
        target = self.target_sparsity * self.steps / method.end_step
        scores = self.magnitude_scores()
        self.apply_masks(self.masks_from_scores(scores, self.allocate(target, scores), monotone_from=self.masks()),
                         "prune")
        return True


class PruneTrainedMethod(SparseTrainingMethod):
    """Prunes the model it is given at once: the job must train it first."""

    needs = frozenset({"trained_model"})


class PruneTrained(Sparsifier):
    method_class = PruneTrainedMethod

    def start(self) -> None:
        self.weights_at_creation = {layer.name: layer.weight.detach().clone() for layer in self.layers}
        scores = self.magnitude_scores()
        self.apply_masks(self.masks_from_scores(scores, self.allocate(self.target_sparsity, scores)), "prune")


class KeepsAMaskMethod(SparseTrainingMethod):
    needs = frozenset({"mask"})


@pytest.fixture()
def registered(monkeypatch):
    """The three methods registered for one test; the registry is restored afterwards."""
    SPARSIFIERS.names()  # the built-in methods are found first, so restoring keeps them
    monkeypatch.setattr(SPARSIFIERS, "_items", dict(SPARSIFIERS._items))
    SPARSIFIERS.register("stepwise")(StepwiseMethod)
    SPARSIFIERS.register("prune_trained")(PruneTrainedMethod)
    SPARSIFIERS.register("keeps_a_mask")(KeepsAMaskMethod)


def synthetic_images(count: int, seed: int) -> ImageSet:
    """Ten classes told apart by which tenth of the image is bright."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    images = torch.randn(count, 1, 28, 28, generator=generator) * 0.3
    for row, label in enumerate(labels.tolist()):
        images[row, 0, :, 2 * label:2 * label + 3] += 2.0
    return ImageSet(images, labels)


DATA = (synthetic_images(200, 0), synthetic_images(100, 1))
BASE = dict(model="mlp", hidden=[16], epochs=2, batch_size=50, lr=0.1, seed=4)  # 4 steps an epoch


def test_a_new_method_gets_its_schedule_and_data_from_the_job(registered):
    recipe = VisionTrainingRecipe(method="stepwise", ratio=0.6, method_args={"every": 2}, **BASE)
    outcome = run_vision(recipe, DATA, evaluate_every_epoch=False)
    sparsifier = outcome.sparsifier
    assert isinstance(sparsifier, Stepwise)
    assert sparsifier.method.settings() == {"name": "stepwise", "end_step": 4, "every": 2}  # half of 8 steps
    images, labels = sparsifier.first_batch
    assert images.shape == (50, 1, 28, 28) and labels.shape == (50,)  # a batch of the seeded training order
    assert [(r["step"], r["event"]) for r in sparsifier.history] == [(0, "start"), (2, "prune"), (4, "prune")]
    assert sparsifier.sparsity == pytest.approx(0.6, abs=1e-2)
    assert outcome.run.steps == 8 and outcome.dense_run is None
    report = vision_report(outcome, len(DATA[0]), len(DATA[1]))
    assert report["method"]["name"] == "stepwise" and report["method"]["every"] == 2
    assert "stepwise (" in vision_markdown(report)


def test_a_method_that_prunes_a_trained_model_is_trained_first_then_fine_tuned(registered):
    recipe = VisionTrainingRecipe(method="prune_trained", ratio=0.5, finetune_epochs=1, **BASE)
    outcome = run_vision(recipe, DATA, evaluate_every_epoch=False)
    sparsifier = outcome.sparsifier
    fresh = build_model(recipe)
    trained_first = [not torch.equal(weight, fresh.get_submodule(name).weight)
                     for name, weight in sparsifier.weights_at_creation.items()]
    assert trained_first and all(trained_first)
    assert outcome.dense_run is not None and outcome.dense_run.steps == 8  # the dense training
    assert outcome.run.steps == 4  # one epoch of fine-tuning under the mask
    assert sparsifier.sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_method_needing_what_the_job_cannot_provide_is_refused_in_one_line(registered):
    with pytest.raises(PrunekitError) as caught:
        VisionTrainingRecipe.build({"method": "keeps_a_mask", **BASE}, where="settings")
    message = str(caught.value)
    assert "keeps_a_mask needs a model that already carries its mask" in message and "\n" not in message

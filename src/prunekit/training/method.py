"""What a sparse-training method is: its settings, what it needs from the training pipeline, and
the settings it derives from the run it joins.

A method object (``SPARSIFIERS.build("rigl")``) is frozen and describes a run exactly, so recipes
and reports can store it; ``method.create(model, sparsity, distribution)`` puts it to work on one
model as a ``Sparsifier``, the stateful optimizer-like object that owns the masks while training.
One method creates sparsifiers on as many models as needed (seeds, or a throwaway model that shows
a run can start before a long dense training).

A pipeline never names a method: it provides what the method's ``needs`` declare (the vocabulary
is ``TRAINING_NEEDS``) and asks ``settings_for(run, given)`` for the settings that depend on the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from prunekit.core.method import Method
from prunekit.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from prunekit.training.base import Sparsifier

SPARSIFIERS: Registry[type["SparseTrainingMethod"]] = Registry("sparse-training method", ("prunekit.training.methods",))

# What a sparse-training method may need from the pipeline that trains with it, and what that means.
TRAINING_NEEDS: dict[str, str] = {
    "schedule": "the run's length in optimizer steps (its schedule is set relative to it)",
    "gradients": "a backward pass of the training loss before every step() (masks grow by gradient)",
    "data": "batches of training examples when it is created (it scores the weights on them)",
    "loss": "a loss for those batches (a classifier's cross-entropy unless loss_fn is given)",
    "input_shape": "the shape of one input (it feeds an all-ones input of that shape)",
    "rounds": "a loop that trains again from the rewind point after every pruning round",
    "trained_model": "a trained model: the pipeline trains it densely first, then fine-tunes under the mask",
    "mask": "a model that already carries its mask (its zeros, or masks given to it)",
}


@dataclass(frozen=True)
class TrainingRun:
    """What a pipeline knows of the training run a method joins, before it starts."""

    total_steps: int  # optimizer steps of one training run (of one round, for methods that train in rounds)
    steps_per_epoch: int
    epochs: int
    input_shape: tuple[int, ...]  # one example, without the batch dimension


class SparseTrainingMethod(Method):
    """The settings of a sparse-training method (pydantic fields) and what it declares.

    ``sparsifier`` is the class ``create`` builds; it is set by that class naming this one as its
    ``method_class``. ``default_distribution`` is the layer-wise allocation used when none is given.
    """

    sparsifier: ClassVar[type["Sparsifier"]]
    default_distribution: ClassVar[str] = "uniform"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.needs) - set(TRAINING_NEEDS))
        if unknown:  # a typo in a declaration would otherwise be a need no pipeline ever provides
            raise TypeError(f"{cls.__name__} needs '{unknown[0]}', which is not one of: {', '.join(TRAINING_NEEDS)}")

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        """The settings for ``run``: the ``given`` ones, and whatever this method derives from the run.

        Methods whose schedule is measured in steps set it relative to ``run.total_steps`` here;
        a given setting always wins. The base method derives nothing.
        """
        return dict(given)

    def create(self, model: "nn.Module", sparsity: float, distribution: Any = None, **provided: Any) -> "Sparsifier":
        """A sparsifier on ``model`` with its masks attached (and pruned as the method starts).

        ``provided`` holds what the method needs beyond its settings (``data`` and ``loss_fn``,
        ``example_input``, ``masks``) and the options every sparsifier takes: ``include``,
        ``exclude``, ``optimizer``, ``seed``.
        """
        return self.sparsifier(model, sparsity, distribution, method=self, **provided)

    @classmethod
    def refusal(cls, provided: frozenset[str] | set[str], pipeline: str) -> str | None:
        """Why a pipeline that provides ``provided`` cannot run this method (None: it can)."""
        missing = sorted(set(cls.needs) - set(provided))
        if not missing:
            return None
        return (f"{cls.name} needs {'; '.join(TRAINING_NEEDS[need] for need in missing)}, "
                f"which {pipeline} cannot provide")

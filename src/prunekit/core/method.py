"""What every method of every dimension is: a small pydantic model of its settings, named by its registration.

A method declares what it needs (``needs``) from the pipeline that runs it; pipelines provide what
is declared and never test a method's name. ``Registry.build(spec)`` makes any method from a name,
``{"name": ..., **settings}`` or ``{name: settings}``, validating every setting up front.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

# What a method may need from the pipeline that runs it (each dimension provides a subset).
NEEDS = frozenset({
    "activations",         # statistics of a layer's calibration inputs (norms, Hessian, moments)
    "gradients",           # gradients of a loss, summed over the calibration data
    "sample_gradients",    # one gradient per calibration sample
    "loss",                # a training objective (labels, or a language model's own loss)
    "schedule",            # the number of training steps it runs over
    "attention",           # attention probabilities (token methods)
    "keys",                # attention keys (token methods)
    "anchor_attention",    # the attention row of the [CLS] or last token (token methods)
    "features",            # hidden states (token methods)
    "labels",              # class labels of the examples (data scores)
    "data",                # batches of training data before training starts (SNIP, GraSP)
    "input_shape",         # the shape of one input, to build data-free inputs (SynFlow)
    "rounds",              # training in rounds, rewound between them (lottery tickets)
    "trained_model",       # a dense model trained first (one-shot magnitude, then fine-tuning)
    "mask",                # an existing mask to keep (recovery fine-tuning)
    "proxy_model",         # a small model trained on the data (data scores)
    "proxy_training",      # that proxy's training run, epoch by epoch (data scores)
    "reference_model",     # a pretrained model that scores each example (perplexity)
    "measurement",         # candidates measured against the dense model's outputs (knapsack, evolutionary search)
})


class Method(BaseModel):
    """The settings of one method; subclasses add fields (validated) and behaviour.

    ``name`` is set by the registry the class is registered in; ``needs`` says what the pipeline
    must provide. Settings are frozen once built, so a method object describes a run exactly.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def settings(self) -> dict[str, Any]:
        """The method as data: its name and every setting (what recipes and reports store)."""
        return {"name": self.name, **self.model_dump(mode="json", by_alias=True)}

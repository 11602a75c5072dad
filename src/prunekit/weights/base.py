"""The interface of a one-shot weight pruning method."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from prunekit.core.masks import apply_keep_mask_, keep_mask
from prunekit.core.patterns import SparsityPattern
from prunekit.core.registry import Registry
from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError

METHODS: Registry[type["OneShotMethod"]] = Registry("method", ("prunekit.weights",))


class OneShotMethod(BaseModel):
    """A pruning criterion (and possibly a weight update) applied to one linear layer at a time.

    Subclasses are pydantic models: their fields are the method's settings, validated when the
    method is built from a name, the CLI or a recipe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    statistics: ClassVar[type[LayerStatistics] | None] = None
    """Statistics of the layer's calibration inputs the method needs; None for data-free methods."""
    comparable_across_layers: ClassVar[bool] = False
    """Whether scores of different layers can be ranked together (what global allocation needs)."""
    per_row: ClassVar[bool] = False
    """Whether unstructured pruning removes the same fraction in every output row."""

    @property
    def needs_calibration(self) -> bool:
        return self.statistics is not None

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        """Importance of every weight (higher = keep), shaped like ``weight``."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, stats: LayerStatistics | None, sparsity: float,
              pattern: SparsityPattern) -> torch.Tensor:
        """Prune ``weight`` (out_features, in_features) in place; return its keep-mask."""
        mask = keep_mask(self.scores(weight.float(), stats), sparsity, pattern, per_row=self.per_row)
        apply_keep_mask_(weight, mask)
        return mask


def get_method(spec: "str | dict[str, Any] | OneShotMethod") -> OneShotMethod:
    """Build a method from its name, a ``{"name": ..., settings...}`` mapping, or pass one through."""
    if isinstance(spec, OneShotMethod):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    settings = dict(spec)
    name = settings.pop("name", None)
    if not name:
        raise PrunekitError("a method needs a name")
    cls = METHODS.get(name)
    try:
        return cls(**settings)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise PrunekitError(f"method {name}: {where}: {problem['msg']}") from None

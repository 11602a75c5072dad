"""The interface of a one-shot weight pruning method."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from prunekit.core.masks import apply_keep_mask_, keep_mask
from prunekit.core.method import Method
from prunekit.core.patterns import SparsityPattern
from prunekit.core.registry import Registry
from prunekit.core.statistics import LayerStatistics

# Looking a method up imports its folder only: no job machinery, no plotting.
METHODS: Registry[type["OneShotMethod"]] = Registry("method", ("prunekit.weights.methods",))


class OneShotMethod(Method):
    """A pruning criterion (and possibly a weight update) applied to one linear layer at a time.

    Subclasses are pydantic models: their fields are the method's settings, validated when the
    method is built from a name, the CLI or a recipe. ``statistics`` is what the method reads of a
    layer's calibration inputs (None: nothing), and so decides whether it ``needs`` activations.
    """

    statistics: ClassVar[type[LayerStatistics] | None] = None
    comparable_across_layers: ClassVar[bool] = False
    """Whether scores of different layers can be ranked together (what global allocation needs)."""
    per_row: ClassVar[bool] = False
    """Whether unstructured pruning removes the same fraction in every output row."""
    updates_kept_weights: ClassVar[bool] = False
    """Whether ``prune`` changes the weights it keeps (SparseGPT's update) rather than only zeroing the others."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.needs = frozenset({"activations"}) if cls.statistics is not None else frozenset()

    @property
    def needs_calibration(self) -> bool:
        return "activations" in self.needs

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
    return METHODS.build(spec)

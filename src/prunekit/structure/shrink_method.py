"""How ``prunekit shrink`` removes parameters other than by deleting coupled units.

The default (no ``method`` in the recipe) deletes channels, neurons and heads ranked by an importance criterion
(``pipeline.prune_structure``). A ``ShrinkMethod`` instead rewrites the layers in another basis (a low-rank
factorisation, a rotation) and is registered by name in ``SHRINK_METHODS``; a method file in
``prunekit.structure.methods`` registers itself by living there.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.method import Method
from prunekit.core.registry import Registry

SHRINK_METHODS: Registry[type["ShrinkMethod"]] = Registry("shrink method", ("prunekit.structure.methods",))


class ShrinkMethod(Method):
    """Settings of one method; ``apply`` rewrites the model in place to remove ``ratio`` of its parameters."""

    needs: ClassVar[frozenset[str]] = frozenset({"activations"})

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line, a model the method cannot shrink: called before any slow step."""

    def apply(self, model: nn.Module, calibration: torch.Tensor, ratio: float, batch_size: int) -> dict[str, Any]:
        """Shrink ``model`` (a causal language model) on the calibration windows; return the report's section."""
        raise NotImplementedError


def get_shrink_method(spec: "str | dict[str, Any] | ShrinkMethod") -> ShrinkMethod:
    return SHRINK_METHODS.build(spec)

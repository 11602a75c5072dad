"""The allocation interface, its registry, and explicit per-layer overrides."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from prunekit.core.method import Method
from prunekit.core.patterns import check_sparsity
from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

ALLOCATIONS: Registry[type["Allocation"]] = Registry("allocation", ("prunekit.core.allocation",))

ScoreFn = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class LayerInfo:
    """What an allocation may know of a layer: its name, weight shape, and block index (if any)."""

    name: str
    shape: tuple[int, ...]
    block: int | None = None

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total


class Allocation(Method):
    """Turns one overall amount into an amount per layer.

    ``needs``: ``scores`` (the method's own importance, comparable across layers) or ``activations``
    (|W|·‖X‖ of the unpruned model from a calibration pass, as OWL reads).
    """

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        raise NotImplementedError


def get_allocation(spec: "str | Mapping[str, Any] | Allocation | None") -> Allocation:
    return ALLOCATIONS.build(spec if spec is not None else "uniform")


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise PrunekitError(f"bad regular expression '{pattern}': {exc}") from None
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def name_matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Glob patterns (``*.mlp.*``) or regular expressions prefixed with ``re:``."""
    return any(_matcher(p)(name) for p in patterns)


def apply_overrides(allocated: dict[str, float], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Explicit ``pattern -> sparsity`` settings win over the allocation; the last matching pattern rules."""
    if not overrides:
        return dict(allocated)
    result = dict(allocated)
    for pattern, value in overrides.items():
        value = check_sparsity(value, f"override for '{pattern}'")
        matched = [name for name in result if _matcher(pattern)(name)]
        if not matched:
            raise PrunekitError(f"override pattern '{pattern}' matches no target layer")
        for name in matched:
            result[name] = value
    return result

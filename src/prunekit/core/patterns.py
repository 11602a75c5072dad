"""Sparsity patterns: unstructured, or N:M (at most N nonzeros in every M consecutive inputs)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prunekit.errors import PrunekitError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """``n == m == 0`` means unstructured; otherwise keep ``n`` of every ``m`` consecutive weights in a row."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: "str | SparsityPattern | None") -> "SparsityPattern":
        if isinstance(text, SparsityPattern):
            return text
        if text is None or str(text).strip().lower() in ("", "unstructured", "none"):
            return cls()
        match = _NM.match(str(text))
        if not match:
            raise PrunekitError(f"malformed pattern '{text}': use N:M such as 2:4, or 'unstructured'")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or not 0 < n < m:
            raise PrunekitError(f"malformed pattern '{text}': N:M needs 0 < N < M and M >= 2")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The sparsity an N:M pattern implies (0 for unstructured, which has none of its own)."""
        return 1.0 - self.n / self.m if self.is_nm else 0.0

    def check_width(self, layer: str, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise PrunekitError(
                f"pattern {self} does not fit layer {layer}: its input width {in_features} is not a multiple of {self.m}"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def check_sparsity(value: float, what: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PrunekitError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise PrunekitError(f"{what} must be in [0, 1), got {value}")
    return value

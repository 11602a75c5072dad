"""Which architectures each pruning dimension works on, checked end to end on tiny random models.

Every check builds a fresh model from a factory, runs the dimension's public entry point as a user
would and verifies what the dimension promises (exact sparsity, a working forward, a model that
reloads identically). A check either passes, or says in one line why the dimension refuses the
architecture; anything else (a crash, a silently wrong result) fails the check. The coverage test
and ``python -m prunekit.tools.support`` (which writes docs/models.md) run the same checks.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

ModelFactory = Callable[[], nn.Module]


@dataclass
class SupportResult:
    """``status``: "yes" (works and verified), "refused" (a one-line reason, from the library) or "broken"."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("yes", "refused")

    def cell(self) -> str:
        if self.status == "yes":
            return "yes" + (f" ({self.detail})" if self.detail else "")
        return f"{self.status}: {self.detail}"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checked_once(check: Callable[[ModelFactory, "object"], SupportResult], windows) -> Callable[[str], SupportResult]:
    """``check`` of each architecture's tiny model, run on first request and remembered (several tests read one
    architecture's result)."""
    from prunekit.tools.support.tiny import tiny_model

    @functools.cache
    def result(model_type: str) -> SupportResult:
        return check(lambda: tiny_model(model_type), windows)

    return result


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its cache under: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

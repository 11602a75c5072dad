"""Patches that change how a model runs and come off exactly: token reduction and kv-cache compression share this.

A patch replaces ``forward`` on module *instances* (never on their classes) and adds hooks; every change it makes
pushes the function that reverts it, so removing the patch leaves the very objects it found. A marker attribute on
the model names the live patch, so a second patch of the same kind is refused instead of stacking.
"""

from __future__ import annotations

import types
from typing import Any, Callable, ClassVar

from torch import nn


class ReversiblePatch:
    """A patch on ``model``; subclasses set ``marker`` and make their changes in ``attach`` through
    ``replace_forward`` and ``add_handle``. ``remove()`` (or leaving a ``with`` block) undoes them."""

    marker: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model
        self.active = False
        self._restore: list[Callable[[], None]] = []

    @classmethod
    def installed_on(cls, model: nn.Module) -> "ReversiblePatch | None":
        """The patch of this kind the model carries now, if any."""
        return getattr(model, cls.marker, None)

    def attach(self) -> None:
        raise NotImplementedError

    def detached(self) -> None:
        """Called once the model is restored (a subclass drops per-pass state here)."""

    def replace_forward(self, module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Give ``module`` an instance-level forward built from its current one; undone on removal."""
        had_own = "forward" in module.__dict__
        own = module.__dict__.get("forward")
        module.forward = types.MethodType(make(module.forward), module)

        def restore() -> None:
            if had_own:
                module.forward = own
            else:
                del module.forward

        self._restore.append(restore)

    def add_handle(self, handle: Any) -> None:
        """A hook handle (anything with ``remove()``) taken off on removal."""
        self._restore.append(handle.remove)

    def install(self):
        """Patch the model (again, after ``remove``); installing an installed patch changes nothing. A failure
        half-way reverts what was done."""
        if self.active:
            return self
        try:
            self.attach()
        except BaseException:
            self._undo()
            raise
        setattr(self.model, self.marker, self)
        self._restore.append(lambda: delattr(self.model, self.marker))
        self.active = True
        return self

    def _undo(self) -> None:
        while self._restore:
            self._restore.pop()()

    def remove(self) -> None:
        """Restore the model exactly as it was. Removing twice is harmless."""
        if not self.active:
            return
        self._undo()
        self.active = False
        self.detached()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

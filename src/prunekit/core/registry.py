"""Name -> implementation registries, so methods are chosen by name and added one file at a time."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from prunekit.errors import PrunekitError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of implementations of one kind (methods, allocations, scores, ...).

    ``packages`` are imported on first lookup, so a method file registers itself just by
    living in one of them; nothing else has to import it.
    """

    def __init__(self, kind: str, packages: tuple[str, ...] = ()):
        self.kind = kind
        self._packages = packages
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def decorator(item: T) -> T:
            existing = self._items.get(key)
            if existing is not None and existing is not item:
                raise RuntimeError(f"{self.kind} '{name}' is registered twice")
            self._items[key] = item
            return item

        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for package in self._packages:
            import_submodules(package)

    def get(self, name: str) -> T:
        self._discover()
        key = str(name).lower()
        if key not in self._items:
            raise PrunekitError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[key]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package_name: str) -> None:
    """Import every module of a package (not recursively), letting each register itself."""
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")

"""Name -> implementation registries, so methods are chosen by name and added one file at a time."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from pydantic import ValidationError

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
        """Register ``item`` under ``name``; a class without its own ``name`` takes this one."""
        key = name.lower()

        def decorator(item: T) -> T:
            existing = self._items.get(key)
            if existing is not None and existing is not item:
                raise RuntimeError(f"{self.kind} '{name}' is registered twice")
            if isinstance(item, type) and not item.__dict__.get("name"):
                try:
                    item.name = key  # type: ignore[attr-defined]
                except TypeError:  # built-in types take no attributes
                    pass
            self._items[key] = item
            return item

        return decorator

    def build(self, spec: Any, **overrides: Any) -> Any:
        """An instance from ``"name"``, ``{"name": name, **settings}``, ``{name: {settings}}`` or an instance.

        Every setting is validated here; a wrong one is a one-line error naming the method and its settings.
        """
        if spec is None:
            raise PrunekitError(f"no {self.kind} given; choose one of: {', '.join(self.names())}")
        if not isinstance(spec, (str, Mapping)):
            if overrides:
                raise PrunekitError(f"give {self.kind} settings either in the object or as keywords, not both")
            return spec
        name, settings = _parse_spec(spec, self.kind)
        cls = self.get(name)
        settings = {**settings, **overrides}
        try:
            return cls(**settings)
        except ValidationError as exc:
            raise _explain(exc, cls, self.kind) from None
        except (TypeError, ValueError) as exc:
            raise PrunekitError(f"{self.kind} {cls.name}: {str(exc).splitlines()[0]}") from None

    def sweep_entries(self, value: Any, swept: str = "ratio", aliases: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The methods of a sweep as data: each one's name and every setting but ``swept``, which the sweep sets
        (given anyway, under its name or an old alias, it is refused). A method named twice is refused."""
        entries = []
        for spec in value if isinstance(value, list) else [value]:
            if isinstance(spec, (str, Mapping)):
                name, settings = _parse_spec(spec, self.kind)
                if any(key in settings for key in (swept, *aliases)):
                    raise PrunekitError(f"{name}: the sweep sets the {swept} from `{swept}s`; leave {swept} out of "
                                        "the method's settings")
            settings = self.build(spec).settings()
            settings.pop(swept, None)
            entries.append(settings)
        names = [entry["name"] for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise PrunekitError(f"methods name {', '.join(repeated)} more than once")
        return entries

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a method registered for a while, by a test or a plugin that is unloaded)."""
        self._discover()
        if self._items.pop(str(name).lower(), None) is None:
            raise PrunekitError(f"unknown {self.kind} '{name}'")

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


def _parse_spec(spec: "str | Mapping[str, Any]", kind: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    settings = dict(spec)
    if "name" in settings:
        return str(settings.pop("name")), settings
    if len(settings) == 1:
        (name, inner), = settings.items()
        if inner is None or isinstance(inner, Mapping):
            return str(name), dict(inner or {})
    raise PrunekitError(f"a {kind} is a name, {{name: ..., settings...}} or {{name: {{settings}}}}; got {dict(spec)!r}")


def _explain(exc: ValidationError, cls: Any, kind: str) -> PrunekitError:
    errors = exc.errors()
    # A misspelt setting also leaves its real name missing: name the misspelling, not the absence.
    problem = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in problem["loc"]) or "settings"
    if problem["type"] == "extra_forbidden":
        fields = getattr(cls, "model_fields", {})
        allowed = sorted(field.alias or key for key, field in fields.items())
        return PrunekitError(f"{kind} {cls.name} has no setting '{where}'; its settings are: "
                             f"{', '.join(allowed) if allowed else 'none'}")
    message = problem["msg"].removeprefix("Value error, ")
    return PrunekitError(f"{kind} {cls.name}: {where}: {message}")

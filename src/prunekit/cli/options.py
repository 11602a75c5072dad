"""The one way every command turns its options into a recipe and runs its job.

``--recipe FILE`` gives the starting settings; options given on the command line override the
matching recipe keys (``data.seq_len`` for nested ones); ``KEY=VALUE`` settings of a method
(``--method-arg dampening=0.01``) are merged into that method's settings when the method stays
the same and replace them when it changes. Options renamed in a release keep working for one
more with a warning (``deprecated``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import typer

from prunekit.core.config import RecipeModel
from prunekit.errors import PrunekitError

NOT_GIVEN = None
BLOCKS = typer.Option(None, help="the model's list of blocks (e.g. model.layers), where its structure does not tell")


def yaml_value(text: str, what: str) -> Any:
    """A command-line value read as YAML: numbers, booleans, strings, flow lists ``[0.5, 0.8]``."""
    import yaml

    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise PrunekitError(f"{what}: cannot read '{text}' (a number, word or [list])") from None


def key_values(items: Iterable[str] | None, what: str, split_at_last: bool = False) -> dict[str, Any]:
    """``KEY=VALUE`` items (values as YAML scalars); ``split_at_last`` for keys that may hold '=' themselves."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.rpartition("=") if split_at_last else item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"{what} '{item}' must look like KEY=VALUE")
        result[key.strip()] = yaml_value(value, f"{what} '{item}'")
    return result


def grouped_key_values(items: Iterable[str] | None, what: str, names: list[str],
                       example: str = "el2n.epoch=2") -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` items grouped by the method they set, one of ``names``; with a single name the
    ``NAME.`` may be left out."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, setting = key.strip().rpartition(".")
        if not sep or not setting:
            raise PrunekitError(f"{what} '{item}' must look like NAME.KEY=VALUE, e.g. {example}")
        if not dot:
            if len(names) != 1:
                raise PrunekitError(f"{what} '{item}': name the method it sets (NAME.{setting}=...) when several "
                                    "are given")
            name = names[0]
        name = name.lower()
        if name not in grouped:
            raise PrunekitError(f"{what} '{item}' names '{name}', which is not among: {', '.join(names)}")
        grouped[name][setting] = yaml_value(value, f"{what} '{item}'")
    return grouped


def numbers(text: str | None, what: str, kind: type = float) -> list | None:
    """A comma-separated list of numbers (``0.3,0.5,0.7``); None when not given."""
    if text is None:
        return None
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise PrunekitError(f"{what} must be comma-separated {'integers' if kind is int else 'numbers'}, "
                            f"got '{text}'") from None
    if not values:
        raise PrunekitError(f"{what} is empty")
    return values


def deprecated(old: str, new: str, value: Any, current: Any = NOT_GIVEN) -> Any:
    """The value of a renamed option: the new one if given, else the old one with a warning."""
    if value is NOT_GIVEN:
        return current
    if current is not NOT_GIVEN:
        raise PrunekitError(f"give {new} or its old name {old}, not both")
    print(f"warning: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr)
    return value


def _get_nested(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _set_nested(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = data.get(part)
        if not isinstance(child, dict):
            child = {}
            data[part] = child
        data = child
    data[parts[-1]] = value


def _method_spec(current: Any, name: str | None, settings: Mapping[str, Any]) -> Any:
    """A method entry after the command line: same method → its settings updated; another → fresh settings."""
    if name is None and not settings:
        return current
    if isinstance(current, str):
        current = {"name": current}
    current = dict(current or {})
    chosen = name or current.get("name")
    if chosen is None:
        raise PrunekitError(f"settings {', '.join(settings)} were given without naming the method they belong to")
    kept = current if str(current.get("name", "")).lower() == str(chosen).lower() else {}
    return {**kept, "name": chosen, **settings}


def build_recipe(recipe_type: type[RecipeModel], recipe_file: Path | None, options: Mapping[str, Any],
                 methods: Mapping[str, tuple] | None = None) -> RecipeModel:
    """The recipe a command runs: ``recipe_file``'s settings, then ``options`` (dotted keys; None = not given),
    then ``methods``: recipe key → (method name or None, its KEY=VALUE settings[, the key holding them when
    the recipe keeps a method's settings beside its name])."""
    data: dict[str, Any] = {}
    if recipe_file is not None:
        data = recipe_type.from_yaml(recipe_file).model_dump(mode="json", by_alias=True)
    for key, value in options.items():
        if value is not NOT_GIVEN:
            _set_nested(data, key, value)
    for key, entry in (methods or {}).items():
        name, settings = entry[0], entry[1]
        settings_key = entry[2] if len(entry) > 2 else None
        if settings_key is None:
            spec = _method_spec(_get_nested(data, key), name, settings)
            if spec is not None:
                _set_nested(data, key, spec)
            continue
        current = {"name": data.get(key), **(data.get(settings_key) or {})} if data.get(key) else None
        spec = _method_spec(current, name, settings)
        if spec is not None:
            spec = dict(spec)
            data[key] = spec.pop("name")
            data[settings_key] = spec
    return recipe_type.build(data, where="settings")


def run_job(job, out: Path | None, overwrite: bool, threads: int | None = None, show: bool = True):
    """Apply ``--threads``, execute the job (its output checked, locked and written atomically), show its summary."""
    from prunekit.cli.contract import apply_threads
    from prunekit.evaluate.outcome import execute

    apply_threads(threads)
    outcome = execute(job, out, overwrite)
    if show:
        print_outcome(outcome)
    return outcome


def print_outcome(outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if outcome.summary:
        table = Table(title=outcome.title or None, show_header=False)
        for key, value in outcome.summary:
            table.add_row(key, value)
        console.print(table)
    if outcome.out_dir is not None:
        console.print(f"written: {outcome.out_dir} ({', '.join(outcome.files)})", highlight=False, soft_wrap=True)

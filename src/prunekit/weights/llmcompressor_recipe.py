"""llm-compressor recipes read as prunekit weight-pruning recipes, so users of the anchor switch with their YAML.

A recipe of llm-compressor's shape (stages ``*_stage``, each with groups ``*_modifiers`` of ``{Modifier: settings}``,
or the groups or modifiers at the top level) holding one of ``WandaPruningModifier``, ``SparseGPTModifier`` or
``MagnitudePruningModifier`` becomes the prunekit settings of the same job:

| llm-compressor | prunekit |
|---|---|
| the modifier | ``method``: wanda, sparsegpt, magnitude |
| ``sparsity`` (``final_sparsity`` for magnitude) | ``ratio`` |
| ``mask_structure`` ``N:M`` (N pruned of every M; ``0:0`` unstructured) | ``pattern`` ``(M-N):M`` (kept of every M) |
| ``sparsity_profile: owl``, ``owl_m``, ``owl_lmbda`` | ``allocation: {name: owl, threshold_m, lambda}`` |
| ``dampening_frac``, ``block_size`` (SparseGPT) | ``method.dampening``, ``method.block_size`` |
| ``targets`` ``Linear`` (every linear layer) or a decoder-layer class | the blocks' linear layers |
| ``targets`` names and ``re:`` patterns (modules containing the layers) | ``include`` |
| ``ignore`` names and ``re:`` patterns | ``exclude`` |

llm-compressor matches ``re:`` patterns from the start of a name (``re.match``), prunekit anywhere in it, so every
pattern is anchored with ``^`` on the way. A ``targets: Linear`` recipe that does not ignore ``lm_head`` would
prune the head as well (tied to the embeddings in many models): it is refused with the line that fixes it.
Settings that change nothing in prunekit's one-shot run (``sequential_update``, ``offload_hessians``, a
magnitude schedule whose start and end ratios are equal) are accepted; any other setting and any other
modifier is refused by name in one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError

ONE_SHOT_MODIFIERS = ("WandaPruningModifier", "SparseGPTModifier", "MagnitudePruningModifier")
_METHODS = {"WandaPruningModifier": "wanda", "SparseGPTModifier": "sparsegpt", "MagnitudePruningModifier": "magnitude"}
_SPARSITY_BASE = {"sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "targets", "ignore",
                  "sequential_update"}
_KNOWN = {
    "WandaPruningModifier": _SPARSITY_BASE,
    "SparseGPTModifier": _SPARSITY_BASE | {"block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians"},
    # start, end, update, ...: a schedule whose start and end ratios are equal prunes once, so they change nothing
    "MagnitudePruningModifier": {"targets", "init_sparsity", "final_sparsity", "mask_structure", "leave_enabled",
                                 "start", "end", "update", "update_scheduler", "scheduler_args", "apply_globally"},
}
_ALL_LAYERS = {"Linear", "__ALL__", "__ALL_PRUNABLE__"}
_HEAD = "lm_head"


def is_llmcompressor_recipe(data: Any) -> bool:
    """Whether parsed YAML has llm-compressor's shape rather than prunekit's keys."""
    return isinstance(data, dict) and any(
        isinstance(key, str) and (key.endswith(("_stage", "_modifiers")) or key.endswith("Modifier")) for key in data)


def _modifiers(data: dict, where: str) -> list[tuple[str, dict]]:
    """Every ``(modifier name, settings)`` of a recipe, whatever stage or group holds it."""
    found: list[tuple[str, dict]] = []

    def group(entries: Any, context: str) -> None:
        if not isinstance(entries, dict):
            raise PrunekitError(f"{where}: {context} must map modifier names to their settings")
        for name, settings in entries.items():
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                raise PrunekitError(f"{where}: the settings of {name} must be a mapping")
            found.append((str(name), settings))

    def stage(entries: Any, context: str) -> None:
        if not isinstance(entries, dict):
            raise PrunekitError(f"{where}: {context} must be a mapping")
        for key, value in entries.items():
            key = str(key)
            if key == "run_type":
                if value != "oneshot":
                    raise PrunekitError(f"{where}: {context} has run_type {value}; prunekit prune runs oneshot stages "
                                        "only (prunekit train prunes during training)")
            elif key.endswith("_modifiers"):
                group(value, key)
            elif key.endswith("Modifier"):
                group({key: value}, context)
            else:
                raise PrunekitError(f"{where}: {context} has '{key}', which prunekit does not read "
                                    "(a stage holds run_type and *_modifiers groups)")

    for key, value in data.items():
        key = str(key)
        if key.endswith("_stage"):
            stage(value, key)
        elif key == "version":
            continue
        else:
            stage({key: value}, "the recipe")
    return found


def _anchored(pattern: str) -> str:
    """An llm-compressor ``re:`` pattern (matched from the start of a name) as prunekit's (searched anywhere)."""
    return f"re:^(?:{pattern})"


def _ignore_pattern(entry: str) -> str:
    return _anchored(entry[3:]) if entry.startswith("re:") else f"re:^{re.escape(entry)}$"


def _matches(entries: list[str], name: str) -> bool:
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)


def _module_pattern(entry: str) -> str:
    """The layers inside the modules an llm-compressor target names (the module itself or anything below it)."""
    if entry.startswith("re:"):
        body = entry[3:]
        # re.match of a module name: a pattern without an end anchor matches every name below it too.
        if body.endswith("$") and not body.endswith("\\$"):
            return f"re:^(?:{body[:-1]})(?:\\..*)?$"
        return _anchored(body)
    return f"re:^{re.escape(entry)}(?:\\..*)?$"


def _parameter_pattern(entry: str, where: str) -> str:
    """A magnitude target names parameters (``...weight``): the layer that holds each."""
    if entry.startswith("re:"):
        body = entry[3:]
        for suffix in (r"\.weight$", r".weight$", r"\.weight", r".weight", "weight$", "weight"):
            if body.endswith(suffix):
                return _module_pattern("re:" + body[: -len(suffix)] + "$")
        raise PrunekitError(f"{where}: MagnitudePruningModifier target '{entry}' does not end in weight; prunekit "
                            "prunes layer weights only")
    if not entry.endswith(".weight"):
        raise PrunekitError(f"{where}: MagnitudePruningModifier target '{entry}' names no weight; prunekit prunes "
                            "layer weights only")
    return f"re:^{re.escape(entry.removesuffix('.weight'))}$"


def _as_list(value: Any, key: str, modifier: str, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PrunekitError(f"{where}: {modifier} {key} must be a name or a list of names")
    return values


def _pattern(structure: Any, modifier: str, where: str) -> str:
    text = str(structure).strip().lower()
    if text in ("0:0", "unstructured"):
        return "unstructured"
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise PrunekitError(f"{where}: {modifier} mask_structure '{structure}' is not supported by prunekit "
                            "(unstructured, 0:0 or N:M)")
    pruned, group = int(match.group(1)), int(match.group(2))
    if not 0 < pruned < group:
        raise PrunekitError(f"{where}: {modifier} mask_structure '{structure}' must prune N of M with 0 < N < M")
    if modifier == "MagnitudePruningModifier" and 2 * pruned != group:
        raise PrunekitError(f"{where}: MagnitudePruningModifier mask_structure '{structure}' is not supported by "
                            "prunekit (unstructured or N:2N)")
    return f"{group - pruned}:{group}"  # llm-compressor counts the pruned weights of a group, prunekit the kept


def translate(data: dict, where: str = "llm-compressor recipe") -> dict[str, Any]:
    """The prunekit ``WeightPruningRecipe`` settings of an llm-compressor recipe (parsed YAML)."""
    modifiers = _modifiers(data, where)
    for name, _ in modifiers:
        if name not in ONE_SHOT_MODIFIERS:
            raise PrunekitError(f"{where}: modifier {name} is not supported by prunekit prune; it runs "
                                f"{', '.join(ONE_SHOT_MODIFIERS)}")
    if len(modifiers) != 1:
        raise PrunekitError(f"{where}: holds {len(modifiers)} pruning modifiers; prunekit prune runs one "
                            f"({', '.join(name for name, _ in modifiers) or 'none given'})")
    modifier, settings = modifiers[0]
    unknown = sorted(set(settings) - _KNOWN[modifier])
    if unknown:
        raise PrunekitError(f"{where}: {modifier} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"{'are' if len(unknown) > 1 else 'is'} not supported by prunekit")
    recipe: dict[str, Any] = {"method": {"name": _METHODS[modifier]}}
    pattern = _pattern(settings.get("mask_structure", "0:0"), modifier, where)
    recipe["pattern"] = pattern
    if modifier == "MagnitudePruningModifier":
        _magnitude(settings, recipe, where)
    else:
        _sparsity_base(modifier, settings, recipe, where)
    if pattern != "unstructured":
        recipe.pop("ratio", None)  # llm-compressor ignores the sparsity of an N:M mask; the pattern fixes it
    return recipe


def _sparsity_base(modifier: str, settings: dict, recipe: dict, where: str) -> None:
    sparsity = settings.get("sparsity")
    if isinstance(sparsity, (list, dict)):
        raise PrunekitError(f"{where}: {modifier} sparsity per layer is not supported here; give one ratio, or use "
                            "prunekit's overrides (--layer-ratio PATTERN=R)")
    if sparsity is None and recipe["pattern"] == "unstructured":
        raise PrunekitError(f"{where}: {modifier} needs a sparsity (or an N:M mask_structure)")
    if sparsity is not None:
        recipe["ratio"] = sparsity
    owl = {key: settings.get(key) for key in ("sparsity_profile", "owl_m", "owl_lmbda")}
    if any(value is not None for value in owl.values()):
        if str(owl["sparsity_profile"]).lower() != "owl" or owl["owl_m"] is None or owl["owl_lmbda"] is None:
            raise PrunekitError(f"{where}: {modifier} needs all of sparsity_profile: owl, owl_m and owl_lmbda, or none")
        recipe["allocation"] = {"name": "owl", "threshold_m": owl["owl_m"], "lambda": owl["owl_lmbda"]}
    if modifier == "SparseGPTModifier":
        if settings.get("preserve_sparsity_mask"):
            raise PrunekitError(f"{where}: SparseGPTModifier preserve_sparsity_mask is not supported by prunekit")
        for theirs, ours in (("dampening_frac", "dampening"), ("block_size", "block_size")):
            if theirs in settings:
                recipe["method"][ours] = settings[theirs]
    ignore = _as_list(settings.get("ignore", []), "ignore", modifier, where)
    targets = _as_list(settings.get("targets", ["Linear"]), "targets", modifier, where)
    include = []
    for target in targets:
        if target in _ALL_LAYERS:
            if not _matches(ignore, _HEAD):
                raise PrunekitError(f"{where}: {modifier} targets {target} without ignoring lm_head, so llm-compressor "
                                    "would prune the head too; add ignore: ['re:.*lm_head'] (prunekit prunes a head "
                                    "only when asked: --include lm_head --untie-embeddings)")
        elif target.endswith("DecoderLayer"):
            pass  # a decoder-layer class: the blocks, prunekit's default
        elif "." in target or target.startswith("re:") or target[:1].islower():
            include.append(_module_pattern(target))
        else:
            raise PrunekitError(f"{where}: {modifier} target class {target} is not supported by prunekit; name the "
                                "layers (module names or re: patterns)")
    if include and any(target in _ALL_LAYERS or target.endswith("DecoderLayer") for target in targets):
        raise PrunekitError(f"{where}: {modifier} mixes a class target with named ones; name the layers only")
    if include:
        recipe["include"] = include
    if ignore:
        recipe["exclude"] = [_ignore_pattern(entry) for entry in ignore]


def _magnitude(settings: dict, recipe: dict, where: str) -> None:
    final = settings.get("final_sparsity")
    if final is None:
        raise PrunekitError(f"{where}: MagnitudePruningModifier needs final_sparsity")
    initial = settings.get("init_sparsity", final)
    if initial != final:
        raise PrunekitError(f"{where}: MagnitudePruningModifier init_sparsity {initial} -> final_sparsity {final} is a "
                            "schedule over training; prunekit prune is one-shot (prunekit train runs schedules)")
    if settings.get("apply_globally"):
        recipe["allocation"] = {"name": "global"}
    recipe["ratio"] = final
    if "targets" not in settings:
        raise PrunekitError(f"{where}: MagnitudePruningModifier needs targets")
    targets = _as_list(settings["targets"], "targets", "MagnitudePruningModifier", where)
    for target in targets:
        if target in _ALL_LAYERS:
            raise PrunekitError(f"{where}: MagnitudePruningModifier target {target} takes every prunable parameter, "
                                "lm_head included; name the weights instead (e.g. 're:model.layers.*weight')")
    recipe["include"] = [_parameter_pattern(target, where) for target in targets]


def read_llmcompressor_recipe(path: str | Path) -> dict[str, Any] | None:
    """The prunekit settings of an llm-compressor recipe file; None when the file is not one."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None  # prunekit's own reader reports the file in its words
    if not is_llmcompressor_recipe(data):
        return None
    return translate(data, where=f"llm-compressor recipe {path}")

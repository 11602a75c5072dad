"""Shrunk directories that plain transformers loads (``trust_remote_code=True``), without prunekit.

A model whose widths differ by layer cannot be described by its family's config. prunekit then
writes, beside the weights and the shape spec (which ``prunekit.load`` reads), the model code of
``prunekit.io.shrunk_modeling`` as ``modeling_shrunk.py``, the modules whose shapes differ from what
the config builds (``shrunk_shapes`` in ``config.json``) and an ``auto_map`` naming the class, so that
``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` rebuilds the model in a
Python without prunekit. ``model_type`` stays the family's, so the config is the family's own.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from torch import nn

from prunekit.io.shrunk_modeling import SHAPES_KEY

MODELING_FILE = "modeling_shrunk.py"
MODELING_MODULE = MODELING_FILE.removesuffix(".py")
CLASS_PREFIX = "Shrunk"
_NOT_SHAPES = {"name_or_path"}  # where the model was read from, not what it is

# The Auto classes a user may load a saved architecture with, by the transformers mapping that lists it.
_AUTO_MAPPINGS = {
    "MODEL_MAPPING_NAMES": "AutoModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForSequenceClassification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "AutoModelForTokenClassification",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "AutoModelForQuestionAnswering",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForImageClassification",
}


def auto_classes(architecture: str) -> list[str]:
    """The Auto classes whose mapping holds ``architecture`` (``AutoModelForCausalLM`` for a ``LlamaForCausalLM``)."""
    from transformers.models.auto import modeling_auto

    found = []
    for mapping_name, auto_class in _AUTO_MAPPINGS.items():
        for value in getattr(modeling_auto, mapping_name).values():
            if architecture in ((value,) if isinstance(value, str) else tuple(value)):
                found.append(auto_class)
                break
    return found


def shape_changes(model_spec: dict, skeleton: nn.Module, skeleton_spec: dict) -> tuple[dict | None, str]:
    """The modules whose tensors or size attributes differ from the skeleton the config builds, or None and
    the reason why resizing that skeleton cannot give the model (a module of another type, a tensor the
    family computes at construction rather than loads)."""
    have, want = model_spec["modules"], skeleton_spec["modules"]
    if set(have) != set(want):
        extra = sorted(set(have) ^ set(want))
        return None, f"the model's modules differ from what its config builds (first: {extra[0]})"
    modules = dict(skeleton.named_modules())
    changes: dict = {}
    for name, entry in have.items():
        base = want[name]
        if entry["type"] != base["type"]:
            return None, f"module '{name}' is a {entry['type']}, its config builds a {base['type']}"
        if set(entry["tensors"]) != set(base["tensors"]):
            return None, f"module '{name}' holds other tensors than its config builds"
        tensors = {k: v for k, v in entry["tensors"].items() if base["tensors"][k] != v}
        computed = set(tensors) & getattr(modules[name], "_non_persistent_buffers_set", set())
        if computed:
            return None, f"the buffer {name}.{sorted(computed)[0]} is computed at construction, not loaded"
        attributes = {k: v for k, v in entry["attributes"].items()
                      if base["attributes"].get(k) != v and k not in _NOT_SHAPES}
        if tensors or attributes:
            changes[name] = {"type": entry["type"], "tensors": tensors, "attributes": attributes}
    return changes, ""


def modeling_source(architectures: list[str]) -> str:
    """This package's ``shrunk_modeling`` followed by one class per architecture."""
    source = resources.files("prunekit.io").joinpath("shrunk_modeling.py").read_text()
    classes = [f"\n\nclass {CLASS_PREFIX}{name}(ShrunkModelMixin, transformers.{name}):\n"
               f"    \"\"\"transformers' {name} with the widths of each layer as shrunk.\"\"\"\n"
               for name in architectures]
    return source + "".join(classes)


def write_remote_code(directory: Path, architecture: str, changes: dict) -> list[str]:
    """Add the model code, ``shrunk_shapes`` and ``auto_map`` to a directory holding the config; returns the
    Auto classes that load it (none: the architecture is in no Auto mapping, and nothing is written)."""
    autos = auto_classes(architecture)
    if not autos:
        return []
    (directory / MODELING_FILE).write_text(modeling_source([architecture]))
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config[SHAPES_KEY] = changes
    config.setdefault("architectures", [architecture])  # what was saved (the loaded class is the Shrunk one)
    config["auto_map"] = {auto: f"{MODELING_MODULE}.{CLASS_PREFIX}{architecture}" for auto in autos}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return autos


def forget_remote_code(config) -> None:
    """Drop the shapes and the code reference from a config read back by prunekit, so that saving the model
    again (shrunk further, pruned, uniform) never carries shapes that no longer hold."""
    for key in (SHAPES_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)


__all__ = ["MODELING_FILE", "auto_classes", "forget_remote_code", "modeling_source", "shape_changes", "write_remote_code"]

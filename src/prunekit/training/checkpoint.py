"""Mid-training checkpoints with the masks attached: model, sparsifier and optimizer in one file.

The file is written atomically with ``torch.save`` and read with ``torch.load(weights_only=True)``.
To resume, build the model and the same sparsifier as before (or none: the masks are re-attached
from the file anyway), then load; training continues exactly where it stopped. For a finished
model, squash the masks and save with ``prunekit.save_dense`` / ``save_compressed`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.masks import attach_mask
from prunekit.errors import PrunekitError
from prunekit.io.atomic import atomic_file
from prunekit.training.base import Sparsifier

FORMAT = "prunekit-training-checkpoint"
VERSION = 1


def save_training_checkpoint(path: str | os.PathLike, model: nn.Module, sparsifier: Sparsifier,
                             optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None,
                             overwrite: bool = False) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise PrunekitError(f"checkpoint {path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise PrunekitError(f"cannot write {path}: directory {path.parent} does not exist")
    state = {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "sparsifier": sparsifier.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "extra": extra or {}}
    with atomic_file(path, "wb") as handle:
        torch.save(state, handle)
    return path


def load_training_checkpoint(path: str | os.PathLike, model: nn.Module, sparsifier: Sparsifier | None = None,
                             optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore masks, weights, the sparsifier's schedule position and the optimizer; returns ``extra``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrunekitError(f"no such training checkpoint: {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling errors come in many types
        raise PrunekitError(f"{path} is not a readable training checkpoint: {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PrunekitError(f"{path} is not a prunekit training checkpoint")
    masks = state["sparsifier"]["masks"]
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PrunekitError(f"the checkpoint masks layer {name}, which this model does not have") from None
        attach_mask(module, mask)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise PrunekitError(f"the checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
    if sparsifier is not None:
        sparsifier.load_state_dict(state["sparsifier"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise PrunekitError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    return dict(state.get("extra", {}))

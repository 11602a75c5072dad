"""Residual connections that carry a linear map instead of the identity (SliceGPT's shortcut matrices).

A pre-norm block computes ``h = x + branch(norm(x))``. When the residual stream entering the block and the
one leaving its branch are expressed in different bases (SliceGPT rotates each by its own PCA and keeps the
first d' coordinates), the residual must be mapped: ``h = x S + branch(norm(x))`` with ``S`` a d' × d' matrix.

The families' block code adds ``x`` itself and cannot be told otherwise, so a ``ResidualShortcut`` changes
the branch's output instead: a pre-hook on the norm that reads the residual remembers ``x``, and a hook on the
branch adds ``x S − x`` to what it returns, so that the block's own ``x + branch`` is ``x S + branch``. No
family's code is touched, and the module paths (hence the checkpoint's tensor names) stay the family's.

An ``InputMap`` is the other linear SliceGPT adds outside the family's code: a d' × d' map applied to a module's
input (a head kept tied to the embeddings, see ``structure.methods.slicegpt``).

Hooks are not saved with a checkpoint, so the model's config records every shortcut and map
(``prunekit_shortcuts``: the module path -> the norm it reads and the branch it corrects, or the module whose
input it maps; its width); ``restore_shortcuts``
rebuilds them before a saved model's tensors are loaded, as ``core.lowrank.restore_lowrank`` does for
low-rank layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError

CONFIG_KEY = "prunekit_shortcuts"


class ResidualShortcut(nn.Module):
    """``x ↦ x Sᵀᵀ``: the residual connection around one branch, stored like a bias-free linear's weight
    (``weight = Sᵀ``, so ``F.linear(x, weight) = x S``)."""

    def __init__(self, width: int, device=None, dtype=None) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(width, width, device=device, dtype=dtype))
        self._residual: torch.Tensor | None = None  # the norm's input of the call under way

    def remember_residual(self, _norm: nn.Module, args: tuple, kwargs: dict) -> None:
        self._residual = args[0] if args else next(iter(kwargs.values()))

    def correct_branch(self, _branch: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        residual, self._residual = self._residual, None
        if residual is None:
            raise RuntimeError("a residual shortcut's branch ran without its norm: the block is not the one "
                               "the shortcut was attached to")
        branch = output[0] if isinstance(output, (tuple, list)) else output
        # In the branch's precision: x S − x is of the size of the residual's change, not of the residual.
        corrected = branch + (F.linear(residual, self.weight) - residual).to(branch.dtype)
        if isinstance(output, tuple):
            return (corrected, *output[1:])
        if isinstance(output, list):
            return [corrected, *output[1:]]
        return corrected

    def extra_repr(self) -> str:
        return f"width={self.width}"


class InputMap(nn.Module):
    """A d' × d' linear applied to another module's input by a pre-hook (``x ↦ x M``, ``weight = Mᵀ``): what a
    head tied to its embeddings needs between the final norm and itself once the two sides are rotated by
    different bases, without untying (and so doubling) the vocabulary's table."""

    def __init__(self, width: int, device=None, dtype=None) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(width, width, device=device, dtype=dtype))

    def map_input(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (F.linear(args[0], self.weight), *args[1:]), kwargs
        name, value = next(iter(kwargs.items()))
        return args, {**kwargs, name: F.linear(value, self.weight)}

    def extra_repr(self) -> str:
        return f"width={self.width}"


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _hook(model: nn.Module, shortcut: ResidualShortcut, reads: str, adds_to: str) -> None:
    try:
        norm, branch = model.get_submodule(reads), model.get_submodule(adds_to)
    except AttributeError:
        raise PrunekitError(f"the config's {CONFIG_KEY} names {reads} or {adds_to}, which the model lacks") from None
    norm.register_forward_pre_hook(shortcut.remember_residual, with_kwargs=True)
    branch.register_forward_hook(shortcut.correct_branch, with_kwargs=True)


def _record(model: nn.Module, path: str, entry: dict) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        entries = dict(getattr(config, CONFIG_KEY, None) or {})
        entries[path] = entry
        setattr(config, CONFIG_KEY, entries)


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PrunekitError(f"the config's {CONFIG_KEY} names {path}, which the model lacks") from None


def _square_map(kind, matrix: torch.Tensor, model: nn.Module, path: str, refusal: str):
    """A ``kind`` module holding ``x ↦ x matrix`` (a width-keeping map), set at ``path``."""
    width = matrix.shape[0]
    if matrix.shape != (width, width):
        raise PrunekitError(f"{refusal}; {tuple(matrix.shape)} is not square")
    module = kind(width, device=matrix.device, dtype=matrix.dtype)
    with torch.no_grad():
        module.weight.copy_(matrix.T)
    _set_submodule(model, path, module)
    return module


def attach_input_map(model: nn.Module, path: str, maps_input_of: str, matrix: torch.Tensor) -> InputMap:
    """Put ``x ↦ x matrix`` at ``path``, applied to the input of ``maps_input_of``, and record it in the config."""
    mapping = _square_map(InputMap, matrix, model, path, "an input map keeps the width")
    width = mapping.weight.shape[0]
    _module(model, maps_input_of).register_forward_pre_hook(mapping.map_input, with_kwargs=True)
    _record(model, path, {"maps_input_of": maps_input_of, "width": width})
    return mapping


def attach_shortcut(model: nn.Module, path: str, reads: str, adds_to: str, matrix: torch.Tensor) -> ResidualShortcut:
    """Put the shortcut ``x ↦ x matrix`` at ``path`` around the branch ``adds_to`` whose norm ``reads`` takes the
    residual, and record it in the model's config."""
    shortcut = _square_map(ResidualShortcut, matrix, model, path, "a residual shortcut maps the stream onto itself")
    width = shortcut.weight.shape[0]
    _hook(model, shortcut, reads, adds_to)
    _record(model, path, {"reads": reads, "adds_to": adds_to, "width": width})
    return shortcut


def restore_shortcuts(model: nn.Module) -> nn.Module:
    """Rebuild, as empty meta-device modules with their hooks, the shortcuts the model's config records
    (before its tensors are loaded)."""
    entries = getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}
    if not isinstance(entries, dict):
        raise PrunekitError(f"the config's {CONFIG_KEY} is not a mapping of module names")
    for path, entry in entries.items():
        try:
            width = int(entry["width"])
            target = entry["maps_input_of"] if "maps_input_of" in entry else entry["reads"]
            adds_to = None if "maps_input_of" in entry else entry["adds_to"]
        except (KeyError, TypeError, ValueError):
            raise PrunekitError(f"the config's {CONFIG_KEY} entry for {path!r} does not match the model") from None
        try:
            existing = model.get_submodule(path)
        except AttributeError:
            existing = None
        if isinstance(existing, (ResidualShortcut, InputMap)):
            continue
        dtype = next((p.dtype for p in _module(model, target).parameters()), None)
        if adds_to is None:
            mapping = InputMap(width, device="meta", dtype=dtype)
            _set_submodule(model, path, mapping)
            _module(model, target).register_forward_pre_hook(mapping.map_input, with_kwargs=True)
        else:
            shortcut = ResidualShortcut(width, device="meta", dtype=dtype)
            _set_submodule(model, path, shortcut)
            _hook(model, shortcut, target, adds_to)
    return model


def residual_shortcuts(model: nn.Module) -> dict[str, ResidualShortcut]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ResidualShortcut)}


def input_maps(model: nn.Module) -> dict[str, InputMap]:
    return {name: module for name, module in model.named_modules() if isinstance(module, InputMap)}


__all__ = ["CONFIG_KEY", "InputMap", "ResidualShortcut", "attach_input_map", "attach_shortcut", "input_maps",
           "residual_shortcuts", "restore_shortcuts"]

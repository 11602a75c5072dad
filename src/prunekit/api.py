"""The small public Python API: prune, evaluate, load and save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.text import TextProtocol, calibration_windows, test_windows
from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.io.checkpoint import save_compressed, save_dense
from prunekit.io.formats import save_model
from prunekit.models.loading import LoadedModel, load, load_model
from prunekit.weights.pipeline import PruneResult, prune_weights

__all__ = ["LoadedModel", "evaluate_perplexity", "load", "load_model", "prune", "save", "save_compressed",
           "save_dense"]


def save(model: nn.Module, out: str | os.PathLike, *, format: str = "huggingface", tokenizer=None,
         overwrite: bool = False, **settings: Any) -> Path:
    """Write a model into a new directory in one of prunekit's formats (``prunekit.io.formats.FORMATS``):
    ``huggingface`` (dense, for ``from_pretrained``), ``compressed`` (``codec="zstd"``), ``shape-spec``."""
    return save_model(model, out, format=format, tokenizer=tokenizer, overwrite=overwrite, **settings)


def prune(model: nn.Module, method: Any = "wanda", ratio: float | None = None, *,
          calibration: torch.Tensor | TextProtocol | str | None = None, tokenizer=None, **settings: Any) -> PruneResult:
    """Prune a model's weights in place: ``ratio`` of the targeted weights (default 0.5, or an N:M ``pattern``'s).

    ``method`` is a name, ``{name: settings}`` or a ``prunekit.weights.PruneSettings``; the other settings
    (``pattern``, ``allocation``, ``include``, ``exclude``, ``overrides``, ``sequential``, ``batch_size``,
    ``untie_embeddings``, ``blocks``) are keywords. ``calibration`` is a tensor of token ids (samples,
    seq_len), a ``TextProtocol``, or the name of a text source ("wiki" or a .txt/.jsonl path) turned into
    windows with ``tokenizer``.

    >>> lm = prunekit.load_model()
    >>> result = prunekit.prune(lm.model, "sparsegpt", pattern="2:4", calibration="wiki", tokenizer=lm.tokenizer)
    """
    if isinstance(calibration, str):
        calibration = TextProtocol(calibration=calibration)
    if isinstance(calibration, TextProtocol):
        if tokenizer is None:
            raise PrunekitError("a tokenizer is needed to turn calibration text into token windows")
        calibration = calibration_windows(tokenizer, calibration)
    return prune_weights(model, method, ratio, calibration=calibration, **settings)


def evaluate_perplexity(model: nn.Module, tokenizer=None, protocol: TextProtocol | None = None,
                        windows: torch.Tensor | None = None, batch_size: int = 4) -> PerplexityResult:
    """Perplexity on the protocol's test windows (default: the pinned wiki protocol)."""
    if windows is None:
        if tokenizer is None:
            raise ValueError("give test windows or a tokenizer")
        windows = test_windows(tokenizer, protocol or TextProtocol())
    return perplexity(model, windows, batch_size)

"""Perplexity over fixed windows: exp of the mean of per-window mean token losses."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.cache import cache_dir
from prunekit.core.progress import progress_bar
from prunekit.io.atomic import write_text
from prunekit.io.digest import directory_digest, file_digest
from prunekit.errors import PrunekitError


@dataclass
class PerplexityResult:
    perplexity: float
    mean_loss: float
    window_losses: list[float] = field(repr=False)
    windows: int = 0
    seq_len: int = 0
    cached: bool = False  # read from the user cache (``cached_perplexity``), not measured in this run

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_loss": self.mean_loss, "windows": self.windows,
                "seq_len": self.seq_len, "cached": self.cached}


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  description: str = "Perplexity") -> list[float]:
    """Mean next-token loss of every window (predicting tokens 2..L from their prefixes)."""
    device = next(model.parameters()).device
    losses: list[float] = []
    with progress_bar(description, windows.shape[0]) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            losses.extend(_next_token_losses(logits, batch))
            bar.advance(batch.shape[0])
            del logits
    return losses


def _next_token_losses(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    shifted = logits[:, :-1].float()
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return loss.view(batch.shape[0], -1).mean(dim=1).tolist()


def from_losses(losses: list[float], seq_len: int) -> PerplexityResult:
    mean = sum(losses) / len(losses)
    if not math.isfinite(mean):
        raise PrunekitError("the model produced NaN or inf losses; its weights or activations are not finite")
    return PerplexityResult(perplexity=math.exp(mean), mean_loss=mean, window_losses=losses, windows=len(losses),
                            seq_len=seq_len)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, description: str = "Perplexity",
               group=None) -> PerplexityResult:
    """``group`` (a ``prunekit.core.distributed.ProcessGroup``) splits the windows across processes."""
    if group is None:
        return from_losses(window_losses(model, windows, batch_size, description), windows.shape[1])
    mine = window_losses(model, group.share(windows), batch_size, description)
    return from_losses(group.gather_lists(mine), windows.shape[1])


@torch.no_grad()
def streamed_perplexity(directory, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu",
                        description: str = "Perplexity (streamed)") -> PerplexityResult:
    """The same figure as ``perplexity``, with only one block of the model in memory at a time.

    The logits come from the model's own code after the blocks (norm, head, any logit scaling).
    """
    from prunekit.core.calibration import SequentialCalibration
    from prunekit.models.streamed import StreamedModel

    streamed = StreamedModel(directory, device=device)
    adapter = streamed.adapter
    steps = SequentialCalibration(adapter, processor=None, mode="dense")
    with streamed.loaded(*streamed.capture_modules()):
        steps.capture(streamed.model, windows, batch_size)
    blocks = adapter.blocks()
    with progress_bar(description, len(blocks) + 1) as bar:
        for index, block in enumerate(blocks):
            with streamed.loaded(block):
                steps.run_block(index, block, [])
            bar.advance()
        losses: list[float] = []
        with streamed.loaded(*streamed.modules_outside_blocks()):
            if streamed.tied:
                adapter.head().weight = adapter.embeddings().weight
            for batch, logits in zip(steps.batches(), steps.logits()):
                losses.extend(_next_token_losses(logits, batch.to(logits.device)))
        bar.advance()
    return from_losses(losses, windows.shape[1])


PERPLEXITY_CACHE = "perplexity"


def cached_perplexity(measure: Callable[[], PerplexityResult], model_path: str | os.PathLike | None,
                      windows: torch.Tensor, settings: dict) -> PerplexityResult:
    """``measure()``, or the figure an earlier run measured for the same model, windows and settings.

    The key is the model files' content digest (``io.digest``: hashed once per file version), the test
    token ids themselves (so the tokenizer, text and protocol are all in it), ``settings`` (what changes the
    number: dtype, device type, batch size, how it is computed) and the prunekit, torch and transformers
    versions. Thread counts are left out: they change the time, not the figure. A model without local files (a hub
    id) is measured every time.
    """
    if model_path is None:
        return measure()
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        prunekit_version = version("prunekit")
    except PackageNotFoundError:
        prunekit_version = "unknown"
    path = Path(model_path)
    tokens = windows.detach().cpu().contiguous()
    key = {"model": directory_digest(path) if path.is_dir() else file_digest(path),
           "windows": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(), "shape": list(tokens.shape),
           "settings": settings, "prunekit": prunekit_version, "torch": torch.__version__,
           "transformers": transformers.__version__}
    entry = cache_dir(PERPLEXITY_CACHE) / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"
    try:
        stored = json.loads(entry.read_text())
        if stored.get("key") == key:
            result = from_losses([float(loss) for loss in stored["window_losses"]], int(stored["seq_len"]))
            result.cached = True
            return result
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = measure()
    try:
        write_text(entry, json.dumps({"key": key, "model_path": str(path), "perplexity": result.perplexity,
                                      "window_losses": result.window_losses, "seq_len": result.seq_len}))
    except OSError:
        pass  # a read-only cache costs the measurement again next time
    return result

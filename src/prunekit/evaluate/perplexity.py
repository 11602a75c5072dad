"""Perplexity over fixed windows: exp of the mean of per-window mean token losses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError


@dataclass
class PerplexityResult:
    perplexity: float
    mean_loss: float
    window_losses: list[float] = field(repr=False)
    windows: int = 0
    seq_len: int = 0

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_loss": self.mean_loss, "windows": self.windows,
                "seq_len": self.seq_len}


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
            shifted = logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
            losses.extend(loss.view(batch.shape[0], -1).mean(dim=1).tolist())
            bar.advance(batch.shape[0])
            del logits, shifted
    return losses


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               description: str = "Perplexity") -> PerplexityResult:
    losses = window_losses(model, windows, batch_size, description)
    mean = sum(losses) / len(losses)
    if not math.isfinite(mean):
        raise PrunekitError("the model produced NaN or inf losses; its weights or activations are not finite")
    return PerplexityResult(perplexity=math.exp(mean), mean_loss=mean, window_losses=losses,
                            windows=windows.shape[0], seq_len=windows.shape[1])

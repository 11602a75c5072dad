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

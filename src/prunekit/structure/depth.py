"""Depth pruning: remove whole residual blocks.

Two ways to rank blocks:

- ``influence``: block influence (ShortGPT, Men et al., 2024), 1 − cos(input, output) averaged
  over calibration tokens; a block that barely turns its input is cheap to drop;
- ``perplexity``: the measured loss increase when the block alone is skipped (one evaluation per
  block, so slower but it measures what matters).

Blocks are removed from their ``nn.ModuleList``; ``layer_idx`` attributes (cache slots) are
renumbered and the config's layer count and per-layer lists are updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError
from prunekit.models.layout import CONFIG_LAYER_INDICES, CONFIG_LAYERS, CONFIG_PER_LAYER, text_config
from prunekit.structure.statistics import run_batch

Criterion = Literal["influence", "perplexity"]


@dataclass
class DepthResult:
    criterion: str
    scores: list[float]  # per original block; higher = more important
    removed: list[int]
    blocks_before: int
    blocks_after: int
    path: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "scores": self.scores, "removed": self.removed,
                "blocks_before": self.blocks_before, "blocks_after": self.blocks_after, "path": self.path}


def block_list(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise PrunekitError(f"'{path}' is not a list of blocks (nn.ModuleList) in {type(model).__name__}")
    return blocks


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_influence(model: nn.Module, path: str, batches: Sequence) -> torch.Tensor:
    """1 − mean cosine similarity between each block's input and output hidden states."""
    blocks = block_list(model, path)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(blocks):
        def before(_m, args, kwargs, index=index):
            inputs[index] = _hidden_of(args, kwargs)

        def after(_m, args, kwargs, output, index=index):
            x, y = inputs.pop(index), _first(output)
            cosine = F.cosine_similarity(x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(), dim=-1)
            totals[index] += (1 - cosine).sum()
            counts[index] += cosine.numel()

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with progress_bar("Block influence", len(batches)) as bar:
            for batch in batches:
                run_batch(model, batch)
                bar.advance()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return totals / counts.clamp_min(1)


@torch.no_grad()
def skip_influence(model: nn.Module, path: str, evaluate: Callable[[nn.Module], float]) -> torch.Tensor:
    """How much ``evaluate`` (a loss: lower is better) rises when each block alone is skipped."""
    blocks = block_list(model, path)
    base = evaluate(model)
    rises = []
    with progress_bar("Skipping blocks one at a time", len(blocks)) as bar:
        for block in blocks:
            def skip(_m, args, kwargs, output):
                hidden = _hidden_of(args, kwargs)
                if isinstance(output, tuple):
                    return (hidden,) + tuple(output[1:])
                return hidden

            handle = block.register_forward_hook(skip, with_kwargs=True)
            try:
                rises.append(evaluate(model) - base)
            finally:
                handle.remove()
            bar.advance()
    return torch.tensor(rises, dtype=torch.float64)


def remove_blocks(model: nn.Module, path: str, indices: Sequence[int]) -> None:
    blocks = block_list(model, path)
    drop = sorted(set(int(i) for i in indices))
    if not drop:
        return
    if drop[0] < 0 or drop[-1] >= len(blocks):
        raise PrunekitError(f"{path} has {len(blocks)} blocks; cannot remove block {drop[-1]}")
    if len(drop) >= len(blocks):
        raise PrunekitError(f"removing all {len(blocks)} blocks of {path} leaves no model; keep at least one")
    kept = [block for i, block in enumerate(blocks) if i not in drop]
    parent_name, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            for name in ("layer_idx", "layer_index", "layer_id"):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, new_index)
    config = text_config(model)
    if config is not None:
        _drop_from_config(config, len(blocks), drop)


def _drop_from_config(config, blocks: int, drop: list[int]) -> None:
    """Describe the kept blocks in the config: the layer count, the per-layer lists (``CONFIG_PER_LAYER``) and
    the lists of layer indices (``CONFIG_LAYER_INDICES``)."""
    for name in CONFIG_LAYERS:
        if isinstance(getattr(config, name, None), int) and getattr(config, name) == blocks:
            setattr(config, name, blocks - len(drop))
    renumbered = {old: new for new, old in enumerate(i for i in range(blocks) if i not in drop)}
    for name in CONFIG_PER_LAYER + CONFIG_LAYER_INDICES:
        values = vars(config).get(name)
        if not isinstance(values, (list, tuple)):
            continue
        if name in CONFIG_LAYER_INDICES:
            setattr(config, name, type(values)(renumbered[i] for i in values if i in renumbered))
        elif len(values) == blocks:
            setattr(config, name, type(values)(v for i, v in enumerate(values) if i not in drop))


def prune_depth(model: nn.Module, path: str, count: int, criterion: Criterion = "influence",
                batches: Sequence | None = None, evaluate: Callable[[nn.Module], float] | None = None,
                keep: Sequence[int] = ()) -> DepthResult:
    """Remove the ``count`` least important blocks of ``model.<path>`` (in place)."""
    blocks = block_list(model, path)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise PrunekitError(f"the number of blocks to remove must be a whole number ≥ 0, got {count!r}")
    if count >= len(blocks):
        raise PrunekitError(f"cannot remove {count} of {len(blocks)} blocks; keep at least one")
    if criterion == "influence":
        if not batches:
            raise PrunekitError("block influence needs calibration batches")
        scores = block_influence(model, path, batches)
    elif criterion == "perplexity":
        if evaluate is None:
            raise PrunekitError("the perplexity criterion needs an evaluation function")
        scores = skip_influence(model, path, evaluate)
    else:
        raise PrunekitError(f"unknown depth criterion '{criterion}'; choose influence or perplexity")
    candidates = [i for i in torch.argsort(scores, stable=True).tolist() if i not in set(keep)]
    if len(candidates) < count:
        raise PrunekitError(f"only {len(candidates)} blocks may be removed (the others are kept), not {count}")
    removed = sorted(candidates[:count])
    before = len(blocks)
    remove_blocks(model, path, removed)
    return DepthResult(criterion, scores.tolist(), removed, before, before - len(removed), path)

"""Depth pruning: remove whole residual blocks.

Two ways to rank blocks:

- ``influence``: block influence (ShortGPT, Men et al., 2024), 1 − cos(input, output) averaged
  over calibration tokens; a block that barely turns its input is cheap to drop;
- ``perplexity``: the measured loss increase when the block alone is skipped (one evaluation per
  block, so slower but it measures what matters).

And one way to choose them together, ``search_blocks`` (issue 18): a measured allocation
(``knapsack`` or ``evolutionary``, ``core.allocation``) over blocks, each unit a block with two levels
(kept, removed), the budget the number removed, the cost and fitness the KL(dense ‖ skipped) of the
final next-token distributions on calibration windows. The knapsack takes the blocks cheapest alone;
the evolution swaps removed and kept blocks while the whole set's KL improves.

Blocks are removed from their ``nn.ModuleList``; ``layer_idx`` attributes (cache slots) are
renumbered and the config's layer count and per-layer lists are updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.allocation import get_allocation
from prunekit.core.allocation.search import MEASUREMENT, SearchOutcome
from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError
from prunekit.models.layout import CONFIG_LAYER_INDICES, CONFIG_LAYERS, CONFIG_PER_LAYER, text_config
from prunekit.structure.statistics import run_batch

Criterion = Literal["influence", "perplexity", "search"]


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
                keep: Sequence[int] = (), search: Any = "evolutionary") -> DepthResult:
    """Remove the ``count`` least important blocks of ``model.<path>`` (in place); with ``criterion="search"``
    the blocks ``search_blocks`` chooses together (``search``: the measured allocation, ``batches``: token-id
    windows), their scores being each block's KL when skipped alone."""
    blocks = block_list(model, path)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise PrunekitError(f"the number of blocks to remove must be a whole number ≥ 0, got {count!r}")
    if count >= len(blocks):
        raise PrunekitError(f"cannot remove {count} of {len(blocks)} blocks; keep at least one")
    if criterion == "search":
        if not batches:
            raise PrunekitError("a depth search needs calibration windows")
        removed, outcome, costs = search_blocks(model, path, count, batches, search, keep)
        candidates = [i for i in range(len(blocks)) if i not in set(keep)]
        alone = dict(zip(candidates, costs)) if costs is not None else {}
        scores = [alone.get(i, float("inf")) for i in range(len(blocks))]
        before = len(blocks)
        remove_blocks(model, path, removed)
        result = DepthResult("search", scores, removed, before, before - len(removed), path)
        if outcome.fitness is not None:
            result.notes.append(f"KL to the unpruned model: {outcome.start_fitness:.5f} at the start, "
                                f"{outcome.fitness:.5f} found")
        return result
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


class _SkippedBlocks:
    """``core.allocation.search.LevelProblem`` over blocks: step 1 skips a block (its output is its input)."""

    def __init__(self, model: nn.Module, path: str, candidates: list[int], count: int, windows: Sequence[torch.Tensor],
                 stage_tokens: Sequence[int]):
        self.model, self.blocks, self.candidates, self.windows = model, block_list(model, path), candidates, windows
        self.unit_names = [f"{path}.{index}" for index in candidates]
        self.unit_weights = [1] * len(candidates)
        self.max_step, self.target = 1, count
        # each stage measures on the first windows holding its tokens
        self.stage_windows = [min(len(windows), max(1, -(-tokens // int(windows[0].numel())))) for tokens in stage_tokens]
        # only the windows a stage measures get dense log-probabilities (batch × tokens × vocabulary floats each)
        self.windows = self.windows[:max(self.stage_windows)]
        self.dense = [self._log_probs(window) for window in self.windows]
        self.state: dict | None = None
        self.cost_table: list[list[float]] | None = None

    @torch.no_grad()
    def _log_probs(self, window: torch.Tensor) -> torch.Tensor:
        output = run_batch(self.model, window)
        return F.log_softmax((output.logits if hasattr(output, "logits") else output[0]).float(), dim=-1)

    def kl(self, skipped: Sequence[int], windows: int) -> float:
        handles = [self.blocks[index].register_forward_hook(_skip, with_kwargs=True) for index in skipped]
        try:
            total = tokens = 0.0
            for window, dense in zip(self.windows[:windows], self.dense[:windows]):
                total += float((dense.exp() * (dense - self._log_probs(window))).sum())
                tokens += dense.shape[0] * dense.shape[1]
        finally:
            for handle in handles:
                handle.remove()
        return total / max(tokens, 1)

    def costs(self) -> list[list[float]]:
        if self.cost_table is None:
            with progress_bar("Skipping blocks one at a time (KL)", len(self.candidates)) as bar:
                self.cost_table = []
                for index in self.candidates:
                    self.cost_table.append([0.0, self.kl([index], self.stage_windows[0])])
                    bar.advance()
        return self.cost_table

    def fitness(self, stage: int, steps: Sequence[int]) -> float:
        return self.kl([index for index, step in zip(self.candidates, steps) if step], self.stage_windows[stage])

    def stages(self) -> int:
        return len(self.stage_windows)

    def load_state(self) -> dict | None:
        return self.state

    def save_state(self, state: dict) -> None:
        self.state = state


def _skip(_module, args, kwargs, output):
    hidden = _hidden_of(args, kwargs)
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def search_blocks(model: nn.Module, path: str, count: int, windows: Sequence[torch.Tensor],
                  allocation: Any = "evolutionary",
                  keep: Sequence[int] = ()) -> tuple[list[int], SearchOutcome, list[float] | None]:
    """Which ``count`` blocks to remove, chosen by a measured allocation (see the module docstring).

    ``windows``: batches of calibration token ids (batch, seq_len) measuring KL; a selection stage (and the costs,
    the first stage) measures on the first windows holding its tokens (``fitness_tokens``: ``stage_tokens`` of
    ``evolutionary``, ``sensitivity_tokens`` of ``knapsack``). Leaves the model whole; returns the blocks to
    remove, the search's outcome and each candidate block's KL when skipped alone (None if not measured).
    """
    chosen = get_allocation(allocation)
    if MEASUREMENT not in chosen.needs:
        raise PrunekitError(f"allocation {chosen.name} does not measure the model; use knapsack or evolutionary")
    blocks = block_list(model, path)
    candidates = [index for index in range(len(blocks)) if index not in set(keep)]
    if count > len(candidates) or count >= len(blocks):
        raise PrunekitError(f"cannot remove {count} of {len(blocks)} blocks ({len(candidates)} may be removed)")
    was_training = model.training
    model.eval()
    try:
        problem = _SkippedBlocks(model, path, candidates, count, list(windows), chosen.fitness_tokens())
        outcome = chosen.search(problem)
    finally:
        model.train(was_training)
    removed = sorted(index for index, step in zip(candidates, outcome.steps) if step)
    alone = [row[1] for row in problem.cost_table] if problem.cost_table is not None else None
    return removed, outcome, alone

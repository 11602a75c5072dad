"""How far a compressed model's outputs are from the dense model's, measured cheaply enough to search with.

``KLMeter`` runs a few calibration windows through the dense model once and keeps what every later
measurement compares against: the dense log-probabilities of the final logits, and (``keep_block_inputs``)
the dense hidden states entering every block. A candidate that changes nothing before block ``i`` then
reruns only blocks ``i`` onwards (a one-unit change in the last blocks costs a few blocks and the head,
not the whole model), and the block's own output error is available as a cheap local proxy.

Memory: the dense log-probabilities take tokens × vocabulary × 4 bytes (2048 tokens of SmolLM2's 49152-word
vocabulary: 400 MB), the kept block inputs blocks × tokens × hidden × 4 bytes (30 × 512 × 576: 35 MB).
Windows run one at a time, so a window's logits (512 × 49152 floats, 100 MB) are the largest transient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.blocks import BlockInputs, BlockStructure, capture_block_inputs, replay_after_blocks
from prunekit.core.memory import release_freed_memory
from prunekit.errors import PrunekitError


def fitness_windows(calibration: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first calibration windows holding ``tokens`` tokens (all of them when there are fewer; one window
    longer than ``tokens`` is cut to them)."""
    seq_len = calibration.shape[1]
    count = min(math.ceil(tokens / seq_len), calibration.shape[0])
    windows = calibration[:count]
    if count == 1 and tokens < seq_len:
        windows = windows[:, :max(tokens, 2)]
    return windows


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


class KLMeter:
    """KL(dense ‖ compressed) of the final logits on fixed windows, the model's current weights against the
    dense weights it had when the meter was made."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, adapter: BlockStructure, windows: torch.Tensor, keep_block_inputs: bool):
        self.model, self.adapter, self.windows = model, adapter, windows
        if windows.shape[0] == 0:
            raise PrunekitError("no calibration windows to measure the fitness on")
        self.inputs: BlockInputs = capture_block_inputs(model, adapter, windows, batch_size=1)
        self.first_hidden = list(self.inputs.hidden)  # the embeddings' output: no search changes it
        self.tokens = int(windows.numel())
        hidden = list(self.first_hidden)
        self.block_inputs: list[list[torch.Tensor]] | None = [] if keep_block_inputs else None
        for index in range(len(adapter.blocks())):
            if self.block_inputs is not None:
                self.block_inputs.append(hidden)
            hidden = [self._call(index, window, h) for window, h in enumerate(hidden)]
        self.dense_output = hidden if keep_block_inputs else None
        self.rebased = False  # whether the kept block inputs are those of other weights than the dense ones
        self.dense_log_probs = [F.log_softmax(self._final_logits(window, h).float(), dim=-1)
                                for window, h in enumerate(hidden)]
        release_freed_memory()

    def _call(self, index: int, window: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``window``'s hidden states, with everything else the model gives that block."""
        self.inputs.hidden = [None] * len(self.first_hidden)
        self.inputs.hidden[window] = hidden
        try:
            return self.inputs.call(self.adapter.blocks()[index], index, window)
        finally:
            self.inputs.hidden = []

    def _final_logits(self, window: int, hidden: torch.Tensor) -> torch.Tensor:
        ids = self.windows[window:window + 1].to(hidden.device)
        return _logits(replay_after_blocks(self.model, self.adapter, ids, hidden, self.inputs.template))[0]

    @torch.no_grad()
    def kl(self, first_block: int = 0) -> float:
        """Mean over tokens of KL(dense ‖ current) of the next-token distributions. ``first_block``: before it the
        model is still the one whose block inputs are kept (the dense one, or the one ``rebase`` saw), so the run
        starts there (needs ``keep_block_inputs``)."""
        if first_block > 0 and self.block_inputs is None:
            raise ValueError("starting after block 0 needs the kept dense block inputs")
        blocks = len(self.adapter.blocks())
        if first_block >= blocks:
            if not self.rebased:
                return 0.0
            first_block = blocks - 1  # the base model's own KL: its last block's kept input is where it starts
        total = 0.0
        for window in range(self.windows.shape[0]):
            hidden = self.block_inputs[first_block][window] if first_block else self.first_hidden[window]
            for index in range(first_block, blocks):
                hidden = self._call(index, window, hidden)
            log_probs = F.log_softmax(self._final_logits(window, hidden).float(), dim=-1)
            dense = self.dense_log_probs[window]
            total += float((dense.exp() * (dense - log_probs)).sum())
        return total / self.tokens

    @torch.no_grad()
    def rebase(self) -> None:
        """Keep the hidden states the model's *current* weights give every block instead of the dense ones:
        ``kl(first_block)`` then measures a model that differs from the current one only from ``first_block`` on
        (the KL is still to the dense model). A search centred on a compressed model (every unit at one level)
        measures one unit's move from it at the cost of the blocks after the unit, as around the dense model."""
        if self.block_inputs is None:
            raise ValueError("rebasing replaces the kept block inputs; make the meter with keep_block_inputs")
        hidden = list(self.first_hidden)
        inputs = []
        for index in range(len(self.adapter.blocks())):
            inputs.append(hidden)
            hidden = [self._call(index, window, h) for window, h in enumerate(hidden)]
        self.block_inputs = inputs
        self.rebased = True
        self.dense_output = None  # block_error compares a block with its dense inputs and outputs, gone now
        release_freed_memory()

    @torch.no_grad()
    def block_error(self, index: int) -> float:
        """‖output − dense output‖² / ‖dense output − input‖² of block ``index`` on the dense inputs: how much
        of what the block adds to its input the current weights change (the local proxy of a unit's cost)."""
        if self.block_inputs is None or self.dense_output is None:
            raise ValueError("the reconstruction error needs the kept dense block inputs (and no rebase)")
        dense_next = self.block_inputs[index + 1] if index + 1 < len(self.block_inputs) else self.dense_output
        outputs = [self._call(index, window, h) for window, h in enumerate(self.block_inputs[index])]
        error = sum(float((o - d).double().square().sum()) for o, d in zip(outputs, dense_next))
        added = sum(float((d - x).double().square().sum()) for d, x in zip(dense_next, self.block_inputs[index]))
        return error / max(added, 1e-30)

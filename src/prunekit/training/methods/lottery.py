"""Iterative magnitude pruning with weight rewinding: lottery tickets (Frankle & Carbin, 2019;
rewinding to an early step: Frankle et al., 2020, "Linear mode connectivity and the lottery ticket hypothesis").

Training runs in rounds of ``steps_per_round`` steps. Round 0 trains the dense model; at its end,
and at the end of every later pruning round, the smallest-magnitude surviving weights are pruned
(globally or per layer, by ``distribution``), and every remaining weight, bias and buffer is reset
bit for bit to the values stored at ``rewind_step`` (0: the initialisation). The optimizer state is
cleared, and later rounds train from ``rewind_step`` to ``steps_per_round`` again, so a loop that
rewinds its learning-rate schedule to ``rewind_step`` when ``step()`` reports a rewind (see
``rewound``) replays the paper's procedure exactly; ``train_sparse`` does this.

The per-round sparsities come from one of: ``per_round`` (prune that share of the surviving
weights each round, the paper's p %, until ``sparsity``), ``rounds`` (N rounds with a constant
rate reaching ``sparsity``), or ``schedule`` (explicit increasing sparsities ending at ``sparsity``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from pydantic import Field, model_validator

from prunekit.core.masks import WeightMask
from prunekit.core.patterns import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.training.base import Sparsifier, check_fraction, check_positive_int
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod, TrainingRun


def round_sparsities(sparsity: float, per_round: float | None, rounds: int | None,
                     schedule: Sequence[float] | None, what: str) -> list[float]:
    given = sum(value is not None for value in (per_round, rounds, schedule))
    if given > 1:
        raise PrunekitError(f"{what}: give one of per_round, rounds or schedule, not several")
    if schedule is not None:
        values = [check_sparsity(v, f"{what}: schedule entry") for v in schedule]
        if not values:
            raise PrunekitError(f"{what}: the schedule is empty")
        if any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
            raise PrunekitError(f"{what}: schedule sparsities must be positive and strictly increasing, got {values}")
        if not math.isclose(values[-1], sparsity, abs_tol=1e-12):
            raise PrunekitError(f"{what}: the schedule ends at {values[-1]}, not at the sparsity {sparsity}")
        return values
    if sparsity == 0:
        return []
    if rounds is not None:
        rounds = check_positive_int(rounds, f"{what}: rounds")
        return [1 - (1 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]
    rate = check_fraction(per_round if per_round is not None else 0.2, f"{what}: per_round")
    values, density = [], 1.0
    while True:
        density *= 1 - rate
        if 1 - density >= sparsity - 1e-12:
            values.append(sparsity)
            return values
        values.append(1 - density)


@SPARSIFIERS.register("lottery")
class LotteryTicketMethod(SparseTrainingMethod):
    """A round's length, the step rewound to, and the per-round sparsities (at most one of
    ``per_round``, ``rounds`` and ``schedule``; 20 % a round by default).

    In a run of known length a round is the whole run, rewound to its first epoch when a round has
    at least 4 epochs, else to initialisation; ``rewind_epoch`` gives the rewind point in epochs.
    """

    default_distribution = "global"
    needs = frozenset({"schedule", "rounds"})

    steps_per_round: int = Field(ge=1)
    rewind_step: int = Field(0, ge=0, description="0 rewinds to initialisation")
    per_round: float | None = Field(None, gt=0, lt=1, description="the share of remaining weights pruned a round")
    rounds: int | None = Field(None, ge=1)
    schedule: list[float] | None = Field(None, description="explicit increasing sparsities ending at the target")

    @model_validator(mode="after")
    def _rounds(self) -> "LotteryTicketMethod":
        if self.rewind_step >= self.steps_per_round:
            raise ValueError(f"rewind_step {self.rewind_step} must come before the end of a round "
                             f"({self.steps_per_round} steps)")
        if sum(value is not None for value in (self.per_round, self.rounds, self.schedule)) > 1:
            raise ValueError("give one of per_round, rounds or schedule, not several")
        return self

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        settings = {"steps_per_round": run.total_steps, "rewind_step": run.steps_per_epoch if run.epochs >= 4 else 0,
                    **given}
        if "rewind_epoch" in settings:
            epoch = settings.pop("rewind_epoch")
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise PrunekitError(f"{cls.name}: rewind_epoch must be a whole number of epochs >= 0, got {epoch!r}")
            settings["rewind_step"] = epoch * run.steps_per_epoch
        return settings


class LotteryTicket(Sparsifier):
    method_class = LotteryTicketMethod

    def prepare(self) -> None:
        method = self.method
        self.round_targets = round_sparsities(self.target_sparsity, method.per_round, method.rounds,
                                              method.schedule, self.name)
        self.round = 0
        self.round_step = 0
        self.rewound = False
        self.snapshot: dict[str, torch.Tensor] | None = None

    def start(self) -> None:
        if self.rewind_step == 0:
            self.snapshot = self._state_to_rewind()

    @property
    def steps_per_round(self) -> int:
        return self.method.steps_per_round

    @property
    def rewind_step(self) -> int:
        return self.method.rewind_step

    @property
    def pruning_rounds(self) -> int:
        return len(self.round_targets)

    @property
    def total_steps(self) -> int:
        """Steps of a full run: the dense round, then every pruned round from ``rewind_step``."""
        return self.steps_per_round + self.pruning_rounds * (self.steps_per_round - self.rewind_step)

    @property
    def finished(self) -> bool:
        return self.round >= self.pruning_rounds

    def derived_settings(self) -> dict:
        return {"round_sparsities": self.round_targets}

    def _tensors_to_rewind(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model except the masks themselves."""
        masks = {id(module.mask) for module in self.model.modules() if isinstance(module, WeightMask)}
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if id(tensor) in masks or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            tensors[name] = tensor
        return tensors

    def _state_to_rewind(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self._tensors_to_rewind().items()}

    def update(self) -> bool:
        self.rewound = False
        self.round_step += 1
        if self.round == 0 and self.round_step == self.rewind_step and self.snapshot is None:
            self.snapshot = self._state_to_rewind()
        if self.finished or self.round_step < self.steps_per_round:
            return False
        target = self.round_targets[self.round]
        scores = self.magnitude_scores()
        masks = self.masks_from_scores(scores, self.allocate(target, scores), monotone_from=self.masks())
        self.apply_masks(masks, f"prune round {self.round + 1}")
        self.rewind()
        self.round += 1
        self.round_step = self.rewind_step
        self.rewound = True
        return True

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every surviving weight (and every other parameter and buffer) to the stored values."""
        if self.snapshot is None:
            raise PrunekitError(f"{self.name}: no weights were stored to rewind to (rewind_step "
                                f"{self.rewind_step} was never reached)")
        current = self._tensors_to_rewind()
        for name, stored in self.snapshot.items():
            current[name].copy_(stored)
        self.enforce_masks()
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def _extra_state(self) -> dict:
        return {"round": self.round, "round_step": self.round_step,
                "snapshot": {k: v.clone() for k, v in (self.snapshot or {}).items()},
                "has_snapshot": self.snapshot is not None}

    def _load_extra_state(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        self.round_step = int(state.get("round_step", 0))
        self.snapshot = dict(state["snapshot"]) if state.get("has_snapshot") else None

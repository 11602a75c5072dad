"""Schedules shared by the training-time methods: when masks change, and by how much.

Steps count completed optimizer steps: ``sparsifier.step()`` after the first ``optimizer.step()``
sees step 1. A schedule point at step 0 happens when the sparsifier is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.core.patterns import check_sparsity
from prunekit.errors import PrunekitError
from prunekit.training.base import check_fraction, check_positive_int, check_step


def default_window(total_steps: int) -> tuple[int, int]:
    """Where a schedule runs by default in a run of ``total_steps``: from 10 % to 75 % of it (the
    pruning window of Zhu & Gupta and RigL's end of updates), or the whole run when that is empty."""
    start, end = int(0.1 * total_steps), max(int(0.75 * total_steps), 1)
    if end <= start:
        return 0, max(total_steps, 1)
    return start, end


def window_problem(start: int, end: int) -> str | None:
    """What is wrong with a schedule from ``start`` to ``end`` (None: nothing)."""
    if end <= start:
        return f"the schedule ends (step {end}) before it starts (step {start}); end_step must be greater than start_step"
    return None


def check_window(start: int, end: int, what: str) -> None:
    problem = window_problem(start, end)
    if problem:
        raise PrunekitError(f"{what}: {problem}")


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta (2017): s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t_end − t₀))³, applied every ``frequency`` steps.

    Pruning happens at t₀, t₀ + Δt, t₀ + 2Δt, … and always at ``end`` (where the final sparsity is
    reached even if ``end − start`` is not a multiple of ``frequency``); masks are fixed afterwards.
    """

    start: int
    end: int
    frequency: int
    initial: float
    final: float

    @classmethod
    def build(cls, start: int, end: int, frequency: int, initial: float, final: float, what: str) -> "CubicSchedule":
        start = check_step(start, f"{what}: start_step")
        end = check_step(end, f"{what}: end_step")
        frequency = check_positive_int(frequency, f"{what}: frequency (the update interval)")
        initial = check_sparsity(initial, f"{what}: initial_sparsity")
        final = check_sparsity(final, f"{what}: sparsity")
        check_window(start, end, what)
        if initial > final:
            raise PrunekitError(f"{what}: initial_sparsity {initial} is above the final sparsity {final}")
        return cls(start, end, frequency, initial, final)

    def sparsity_at(self, step: int) -> float:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        remaining = 1.0 - (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * remaining ** 3

    def is_update(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.frequency == 0 or step == self.end)

    def to_dict(self) -> dict:
        return {"start_step": self.start, "end_step": self.end, "frequency": self.frequency,
                "initial_sparsity": self.initial}


@dataclass(frozen=True)
class UpdateSchedule:
    """Dynamic sparse training: every ``interval`` steps until ``end``, drop and regrow a fraction of
    the active weights; the fraction decays from ``fraction`` with a cosine (RigL) or stays constant."""

    interval: int
    end: int
    fraction: float
    decay: str = "cosine"
    start: int = 0

    @classmethod
    def build(cls, interval: int, end: int, fraction: float, decay: str, what: str, start: int = 0) -> "UpdateSchedule":
        interval = check_positive_int(interval, f"{what}: update_interval")
        end = check_positive_int(end, f"{what}: end_step")
        start = check_step(start, f"{what}: start_step")
        fraction = check_fraction(fraction, f"{what}: drop_fraction")
        if decay not in ("cosine", "constant"):
            raise PrunekitError(f"{what}: decay must be cosine or constant, got {decay!r}")
        if end <= start:
            raise PrunekitError(f"{what}: the schedule ends (step {end}) before it starts (step {start})")
        return cls(interval, end, fraction, decay, start)

    def is_update(self, step: int) -> bool:
        return self.start < step < self.end and (step - self.start) % self.interval == 0

    def fraction_at(self, step: int) -> float:
        if self.decay == "constant":
            return self.fraction
        return self.fraction / 2 * (1 + math.cos(math.pi * step / self.end))

    def to_dict(self) -> dict:
        return {"update_interval": self.interval, "end_step": self.end, "drop_fraction": self.fraction,
                "decay": self.decay}

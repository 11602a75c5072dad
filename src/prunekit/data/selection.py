"""Turn scores into the kept subset: how many, which end, and per class or not.

``keep`` is a fraction in (0, 1] (the kept count is ``round(keep * N)``, at least 1) or ``count``
an exact number. ``balance="proportional"`` applies the strategy inside every class with quotas
proportional to the class sizes (largest-remainder rounding, so the total is exact and the class
mix is preserved); ``balance="equal"`` gives every class the same quota (capped by its size, the
rest shared among the larger classes). The result is the sorted row indices of the kept examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prunekit.data.base import HIGHER, LOWER, STRATEGIES, Strategy, oriented
from prunekit.data.table import ScoreTable
from prunekit.errors import PrunekitError

BALANCES = ("none", "proportional", "equal")


@dataclass
class Selection:
    """The kept rows (ascending) and how they were chosen."""

    indices: np.ndarray
    total: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def fraction(self) -> float:
        return len(self) / self.total

    def mask(self) -> np.ndarray:
        keep = np.zeros(self.total, dtype=bool)
        keep[self.indices] = True
        return keep


def kept_count(total: int, ratio: float | None = None, count: int | None = None) -> int:
    """The number of examples kept from ``total``: exactly one of the fraction removed (``ratio``) or a kept count."""
    if (ratio is None) == (count is None):
        raise PrunekitError("give either the fraction of examples removed (--ratio) or the number kept (--count)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise PrunekitError(f"the removed fraction (ratio) must be a number in [0, 1), got {ratio!r}")
        if not 0.0 <= ratio < 1.0:
            raise PrunekitError(f"the removed fraction (ratio) must be in [0, 1), got {ratio}")
        return max(1, int(math.floor((1.0 - ratio) * total + 0.5)))
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise PrunekitError(f"the kept count must be a whole number, got {count!r}")
    if not 1 <= count <= total:
        raise PrunekitError(f"the kept count must be between 1 and the {total} examples, got {count}")
    return int(count)


def class_quotas(labels: np.ndarray, count: int, balance: str) -> dict[int, int]:
    """How many examples each class keeps; the quotas add up to ``count`` exactly."""
    classes, sizes = np.unique(labels, return_counts=True)
    total = int(sizes.sum())
    if balance == "proportional":
        ideal = count * sizes / total
        quotas = np.floor(ideal).astype(np.int64)
        remainder = count - int(quotas.sum())
        # largest fractional parts first; ties go to the larger class, then the lower class id
        order = np.lexsort((classes, -sizes, -(ideal - quotas)))
        quotas[order[:remainder]] += 1
    else:  # equal: water-filling, a small class keeps all it has and its share goes to the others
        quotas = np.zeros(len(classes), dtype=np.int64)
        left = count
        open_classes = list(range(len(classes)))
        while left > 0 and open_classes:
            share, extra = divmod(left, len(open_classes))
            still_open = []
            given = 0
            for position, c in enumerate(open_classes):
                want = share + (1 if position < extra else 0)
                take = min(want, int(sizes[c] - quotas[c]))
                quotas[c] += take
                given += take
                if quotas[c] < sizes[c]:
                    still_open.append(c)
            left -= given
            if given == 0:
                break
            open_classes = still_open
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def select(scores: ScoreTable | np.ndarray, score: str | None = None, *, ratio: float | None = None,
           count: int | None = None, strategy: str | Strategy = "hardest", balance: str = "none",
           labels: np.ndarray | None = None, harder: str = HIGHER, seed: int = 0, keep: float | None = None,
           **strategy_settings) -> Selection:
    """Choose the kept examples: all but the fraction ``ratio`` (or ``count`` of them).

    ``scores`` is a :class:`ScoreTable` (then ``score`` names the column, labels come with it) or a
    plain array of one score per example (``harder`` says which end is hard, ``labels`` is needed
    for class balance). ``strategy`` is hardest, easiest, middle, random or ccs (settings as keywords,
    e.g. ``hard_cut=0.2``). ``keep`` (the kept fraction, ``1 - ratio``) is deprecated.
    """
    if keep is not None:
        from prunekit.core.config import warn_renamed

        if ratio is not None:
            raise PrunekitError("give the removed fraction (ratio) or the deprecated kept fraction (keep), not both")
        warn_renamed("keep", "ratio (the fraction removed: 1 - keep)")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise PrunekitError(f"the kept fraction must be in (0, 1], got {keep!r}")
        ratio = 1.0 - keep
    if isinstance(scores, ScoreTable):
        if score is None:
            if len(scores.names) != 1:
                raise PrunekitError(f"these scores hold {', '.join(scores.names)}; name the one to select by (--score)")
            score = scores.names[0]
        hardness = scores.hardness(score)
        direction = scores.direction(score)
        labels = scores.labels if labels is None else np.asarray(labels)
    else:
        if harder not in (HIGHER, LOWER):
            raise PrunekitError(f"harder must be higher or lower, got '{harder}'")
        values = np.asarray(scores, dtype=np.float64)
        if values.ndim != 1:
            raise PrunekitError(f"scores must be one number per example, got shape {values.shape}")
        hardness, direction = oriented(values, harder), harder
        score = score or "score"
    total = hardness.shape[0]
    if total == 0:
        raise PrunekitError("there are no scores to select from")
    if not np.isfinite(hardness).all():
        raise PrunekitError(f"score '{score}' has {int((~np.isfinite(hardness)).sum())} missing or infinite values")
    if balance not in BALANCES:
        raise PrunekitError(f"class balance must be one of {', '.join(BALANCES)}, got '{balance}'")
    target = kept_count(total, ratio, count)
    chooser = STRATEGIES.build(strategy, **strategy_settings)
    rng = np.random.default_rng(seed)
    if balance != "none":
        if labels is None:
            raise PrunekitError(f"class-balanced selection ({balance}) needs labels, but these examples have none")
        labels = np.asarray(labels)
        if labels.shape[0] != total:
            raise PrunekitError(f"{labels.shape[0]} labels for {total} scores")
        quotas = class_quotas(labels, target, balance)
        parts = []
        for label, quota in quotas.items():
            members = np.flatnonzero(labels == label)
            if quota:
                parts.append(members[_checked(chooser.choose(hardness[members], quota, rng), quota, members.size)])
        chosen = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    else:
        quotas = None
        chosen = _checked(chooser.choose(hardness, target, rng), target, total)
    indices = np.sort(chosen.astype(np.int64))
    if np.unique(indices).shape[0] != indices.shape[0] or indices.shape[0] != target:
        raise RuntimeError(f"strategy {chooser.name} chose {indices.shape[0]} rows for {target} (or repeated one)")
    meta = _describe(score, direction, chooser, balance, seed, hardness, indices, total, target, labels, quotas,
                     ratio=ratio, count=count)
    return Selection(indices, total, meta)


def _checked(positions: np.ndarray, expected: int, size: int) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    if positions.shape[0] != expected or (positions.size and (positions.min() < 0 or positions.max() >= size)):
        raise RuntimeError(f"a strategy returned {positions.shape[0]} positions for {expected}")
    return positions


def _describe(score: str, direction: str, chooser: Strategy, balance: str, seed: int, hardness: np.ndarray,
              indices: np.ndarray, total: int, target: int, labels: np.ndarray | None,
              quotas: dict[int, int] | None, ratio: float | None, count: int | None) -> dict[str, Any]:
    kept = np.zeros(total, dtype=bool)
    kept[indices] = True
    value = hardness if direction == HIGHER else -hardness
    meta: dict[str, Any] = {
        "score": score, "harder": direction, "strategy": chooser.settings(),
        "strategy_notes": chooser.notes(), "balance": balance, "seed": seed,
        "requested": {"ratio": ratio, "count": count}, "total": total, "kept": target, "kept_fraction": target / total,
        "score_mean_kept": float(value[kept].mean()),
        "score_mean_dropped": float(value[~kept].mean()) if (~kept).any() else None,
    }
    if labels is not None:
        classes, before = np.unique(labels, return_counts=True)
        after = np.array([int(kept[labels == c].sum()) for c in classes])
        meta["per_class"] = {int(c): {"total": int(b), "kept": int(a)} for c, b, a in zip(classes, before, after)}
    return meta

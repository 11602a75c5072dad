"""Scores of every example, kept together with what produced them, and their files.

``scores.csv`` has one row per example: ``index`` (the row of the input), ``label`` (as given,
empty for unlabelled data) and one column per score, written with full float precision so that
reading it back gives the same numbers. ``scores.json`` holds everything else: each score's
definition, direction and settings, the proxy training, the data's fingerprint, timings and the
environment.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.data.base import HIGHER, LOWER, oriented
from prunekit.errors import PrunekitError

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"


@dataclass
class ScoreTable:
    """Per-example scores (one array per score name), labels and the run's metadata."""

    scores: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # class ids
    label_values: list | None = None  # labels as given
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(v) for v in self.scores.values()}
        if len(lengths) > 1:
            raise PrunekitError("score columns differ in length")

    def __len__(self) -> int:
        if self.scores:
            return len(next(iter(self.scores.values())))
        return 0 if self.labels is None else len(self.labels)

    @property
    def names(self) -> list[str]:
        return list(self.scores)

    def direction(self, name: str) -> str:
        info = self.meta.get("scores", {}).get(name, {})
        return info.get("harder", HIGHER)

    def values(self, name: str) -> np.ndarray:
        if name not in self.scores:
            have = ", ".join(self.scores) or "none"
            raise PrunekitError(f"no score '{name}' in these scores; they hold: {have}")
        return self.scores[name]

    def hardness(self, name: str) -> np.ndarray:
        """The score turned so that higher means harder."""
        return oriented(self.values(name), self.direction(name))

    # files -------------------------------------------------------------------------------------
    def write(self, folder: Path) -> None:
        from prunekit.evaluate.report import write_json
        from prunekit.io.atomic import atomic_file

        with atomic_file(folder / SCORES_CSV, "w") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["index", "label", *self.scores])
            columns = [self.scores[name] for name in self.scores]
            for i in range(len(self)):
                label = "" if self.label_values is None else self.label_values[i]
                writer.writerow([i, label, *(repr(float(column[i])) for column in columns)])
        write_json(folder / SCORES_JSON, self.meta)

    @classmethod
    def read(cls, path: str | Path) -> "ScoreTable":
        """Read ``scores.csv`` (and ``scores.json`` beside it) from a folder or the CSV path."""
        path = Path(path).expanduser()
        csv_path = path / SCORES_CSV if path.is_dir() else path
        if not csv_path.exists():
            raise PrunekitError(f"no scores at {path}: expected {SCORES_CSV} (run `prunekit data score` first)")
        if csv_path.stat().st_size == 0:
            raise PrunekitError(f"{csv_path} is empty")
        meta_path = csv_path.with_name(SCORES_JSON)
        meta: dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise PrunekitError(f"{meta_path} is corrupt: {exc}") from None
        try:
            with open(csv_path, newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if not header or header[:2] != ["index", "label"] or len(header) < 3:
                    raise PrunekitError(f"{csv_path} is not a scores file: its header must be index,label,<scores>")
                names = header[2:]
                rows = list(reader)
        except UnicodeDecodeError:
            raise PrunekitError(f"{csv_path} is not UTF-8 text") from None
        if not rows:
            raise PrunekitError(f"{csv_path} has no rows")
        values = {name: np.empty(len(rows), dtype=np.float64) for name in names}
        labels: list[str] = []
        for number, row in enumerate(rows):
            if len(row) != len(header):
                raise PrunekitError(f"{csv_path} line {number + 2} has {len(row)} fields, expected {len(header)}")
            if row[0] != str(number):
                raise PrunekitError(f"{csv_path} line {number + 2}: index {row[0]!r}, expected {number} "
                                    "(rows must be in input order, one per example)")
            labels.append(row[1])
            for name, cell in zip(names, row[2:]):
                try:
                    values[name][number] = float(cell)
                except ValueError:
                    raise PrunekitError(f"{csv_path} line {number + 2}: {name} = {cell!r} is not a number") from None
        label_values = None if all(cell == "" for cell in labels) else labels
        if label_values is not None and any(cell == "" for cell in labels):
            raise PrunekitError(f"{csv_path}: some rows have a label and some do not")
        label_ids = None
        if label_values is not None:
            # the class order of the scoring run (kept in scores.json); text labels alone cannot tell 7 from "7"
            stored = meta.get("data", {}).get("classes")
            classes = ([str(c) for c in stored] if stored and set(map(str, stored)) >= set(label_values)
                       else sorted(set(label_values), key=_label_sort_key))
            lookup = {value: i for i, value in enumerate(classes)}
            label_ids = np.array([lookup[v] for v in label_values], dtype=np.int64)
        for name in names:
            direction = meta.get("scores", {}).get(name, {}).get("harder", HIGHER)
            if direction not in (HIGHER, LOWER):
                raise PrunekitError(f"{meta_path}: score '{name}' has an unknown direction '{direction}'")
        return cls(values, label_ids, label_values, meta)


def _label_sort_key(value: str):
    """Labels read back from CSV are text; integers sort as numbers so class ids match the scoring run."""
    try:
        return (0, int(value), "")
    except ValueError:
        return (1, 0, value)


def summary_rows(table: ScoreTable) -> list[list[Any]]:
    rows = []
    for name, values in table.scores.items():
        finite = values[np.isfinite(values)]
        rows.append([name, table.direction(name), float(finite.mean()), float(finite.std()), float(finite.min()),
                     float(np.median(finite)), float(finite.max())])
    return rows


def rank_correlations(table: ScoreTable) -> dict[str, dict[str, float]]:
    """Spearman rank correlation between every pair of scores (how much they agree on the order)."""
    from scipy.stats import spearmanr

    names = table.names
    result: dict[str, dict[str, float]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i:]:
            if a == b:
                value = 1.0
            else:
                x, y = table.scores[a], table.scores[b]
                value = float(spearmanr(x, y).statistic) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
            result[a][b] = result[b][a] = value
    return result

"""The jobs behind ``prunekit data score | select | prune``: validate, compute, write atomically, report.

Everything is checked before any work starts (outputs, data, score names and settings); outputs
appear whole or not at all; only process 0 of a ``torchrun`` group writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from prunekit.core.config import RecipeModel
from prunekit.core.distributed import ProcessGroup, current_group
from prunekit.core.job import Job, Outcome
from prunekit.data.base import SCORES, STRATEGIES
from prunekit.data.proxy import ProxyConfig
from prunekit.data.scoring import make_score, score_data
from prunekit.data.selection import Selection, select
from prunekit.data.sources import DataSource, open_data
from prunekit.data.table import ScoreTable, rank_correlations, summary_rows
from prunekit.errors import PrunekitError

INDICES_FILE = "indices.txt"
SELECTION_JSON = "selection.json"
REPORT_MD = "report.md"


class DataReading(RecipeModel):
    """How to read the user's data (the command line's reading options)."""

    text_field: str | None = "text"
    labels: bool = Field(True, description="false: treat the data as unlabelled")
    label_field: str = Field("auto", description="the column holding the class label ('auto': 'label' when present)")
    features: list[str] | None = None
    text_unit: Literal["line", "paragraph"] = "line"
    input_key: str | None = None
    limit: int | None = Field(None, ge=1, description="read only the first N examples")

    def open(self, data: Any) -> DataSource:
        return open_data(data, text_field=self.text_field, label_field=self.label_field if self.labels else None,
                         features=self.features,
                         text_unit=self.text_unit, input_key=self.input_key, limit=self.limit)


class ProxySettings(RecipeModel):
    """The proxy model proxy scores read (``prunekit.data.proxy.ProxyConfig``)."""

    model: Literal["auto", "cnn", "mlp"] = "auto"
    epochs: int = Field(3, ge=0)
    seeds: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    cnn_width: int = Field(16, ge=1)
    device: str = "cpu"

    def config(self) -> ProxyConfig:
        return ProxyConfig(**self.model_dump())


class SelectionSettings(RecipeModel):
    """Which examples are kept: all but the fraction ``ratio`` (or ``count`` of them), chosen by one score."""

    score: str | None = Field(None, description="the score to select by [default: the only (or first) one]")
    ratio: float | None = Field(None, ge=0, lt=1, description="fraction of the examples removed")
    count: int | None = Field(None, ge=1, description="number of examples kept (instead of ratio)")
    strategy: dict[str, Any] = Field(default_factory=lambda: {"name": "hardest"})
    balance: Literal["none", "proportional", "equal"] = "none"
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _kept_fraction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("keep") is not None:
            from prunekit.core.config import warn_renamed

            if data.get("ratio") is not None:
                raise ValueError("give the removed fraction (ratio) or the deprecated kept fraction (keep), not both")
            warn_renamed("keep", "ratio (the fraction removed: 1 - keep)")
            data = {**data, "ratio": 1.0 - float(data.pop("keep"))}
        elif isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "keep"}
        return data

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> dict[str, Any]:
        return STRATEGIES.build(value).settings()

    @model_validator(mode="after")
    def _one_amount(self) -> "SelectionSettings":
        if (self.ratio is None) == (self.count is None):
            raise ValueError("give either the fraction of examples removed (ratio) or the number kept (count)")
        return self

    def choose(self, table: ScoreTable, default_score: str | None = None) -> Selection:
        strategy = dict(self.strategy)
        selection = select(table, self.score or default_score, ratio=self.ratio, count=self.count,
                           strategy=strategy.pop("name"), balance=self.balance, seed=self.seed, **strategy)
        classes = table.meta.get("data", {}).get("classes")
        if classes and "per_class" in selection.meta:
            selection.meta["class_names"] = {i: str(name) for i, name in enumerate(classes)}
        return selection


class DataScoreRecipe(RecipeModel):
    """``prunekit data score`` (and ``data prune``, which also selects and writes the kept rows)."""

    data: str = Field(description="a data file, or fashion-mnist[:train|test]")
    scores: list[dict[str, Any]] = Field(min_length=1)
    reading: DataReading = Field(default_factory=DataReading)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    encoder: str | None = Field(None, description="sentence encoder for text [default: all-MiniLM-L6-v2]")
    text_batch_size: int = Field(16, ge=1)
    seed: int = Field(0, description="seed of the random score (proxy seeds are 0..seeds-1)")
    selection: SelectionSettings | None = None

    @field_validator("scores", mode="before")
    @classmethod
    def _scores(cls, value: Any) -> list[dict[str, Any]]:
        specs = value if isinstance(value, list) else [value]
        return [make_score(spec).settings() for spec in specs]

    @model_validator(mode="after")
    def _selection_names_a_scored_score(self) -> "DataScoreRecipe":
        names = [spec["name"] for spec in self.scores]
        if self.selection is not None and self.selection.score is not None and self.selection.score not in names:
            raise ValueError(f"selecting by {self.selection.score}, which is not among the computed scores: "
                             f"{', '.join(names)}")
        return self


class DataSelectRecipe(RecipeModel):
    """``prunekit data select``: choose from a scores file; with ``data``, also write the kept rows."""

    scores: str = Field(description="a scores directory (or its scores.csv)")
    data: str | None = None
    reading: DataReading = Field(default_factory=DataReading)
    selection: SelectionSettings


def _input_path(data: Any) -> Path | None:
    if isinstance(data, (str, Path)) and Path(str(data)).expanduser().exists():
        return Path(str(data)).expanduser()
    return None


class DataScoreJob(Job[DataScoreRecipe]):
    """Score every example (collectively across a ``torchrun`` group; process 0 writes); with a selection,
    also choose the kept examples and write them in the data's own format."""

    command = "data score"
    recipe_type = DataScoreRecipe

    def __init__(self, recipe: DataScoreRecipe, world: ProcessGroup | None = None):
        super().__init__(recipe)
        self.world = world or current_group()
        self.writer = self.world.is_writer

    def inputs(self) -> tuple[str | None, ...]:
        path = _input_path(self.recipe.data)
        return (str(path) if path else None,)

    def run(self) -> Outcome:
        recipe = self.recipe
        self.source = recipe.reading.open(recipe.data)
        self.table = score_data(self.source, recipe.scores, proxy=recipe.proxy.config(), seed=recipe.seed,
                                encoder=recipe.encoder, text_batch_size=recipe.text_batch_size, world=self.world)
        self.selection = None
        if recipe.selection is not None:
            self.selection = recipe.selection.choose(self.table, recipe.scores[0]["name"])
        table, meta = self.table, self.table.meta
        summary = [("data", f"{meta['data']['description']} ({len(table)} rows)"), ("scores", ", ".join(table.names)),
                   ("processes", f"{self.world.world_size} × {meta['threads_per_process']} threads"),
                   ("time", f"{meta['timings']['total_seconds']:.1f} s")]
        if self.selection is not None:
            summary.append(("kept", _kept_line(self.selection)))
        report = {"scores": table.meta, "selection": self.selection.meta if self.selection is not None else None}
        return Outcome(report, score_report(table), summary, "prunekit data")

    def write(self, directory: Path, outcome: Outcome) -> None:
        self.table.write(directory)
        if self.selection is not None:
            written = _write_selection(directory, self.selection, self.source)
            outcome.markdown += "\n" + selection_report(self.selection, written)
            outcome.report["selection"] = self.selection.meta


class DataSelectJob(Job[DataSelectRecipe]):
    command = "data select"
    recipe_type = DataSelectRecipe

    def inputs(self) -> tuple[str | None, ...]:
        data = _input_path(self.recipe.data)
        return (self.recipe.scores, str(data) if data else None)

    def run(self) -> Outcome:
        recipe = self.recipe
        self.table = ScoreTable.read(Path(recipe.scores).expanduser())
        self.source = None
        if recipe.data is not None:
            self.source = recipe.reading.open(recipe.data)
            check_scores_match(self.table, self.source)
        self.selection = recipe.selection.choose(self.table)
        meta = self.selection.meta
        summary = [("kept", _kept_line(self.selection)),
                   ("by", f"{meta['score']} ({meta['harder']} = harder), balance {meta['balance']}")]
        return Outcome({"selection": meta}, "", summary, "prunekit data select")

    def write(self, directory: Path, outcome: Outcome) -> None:
        written = _write_selection(directory, self.selection, self.source)
        outcome.markdown = selection_report(self.selection, written)
        outcome.report["selection"] = self.selection.meta


def _kept_line(selection: Selection) -> str:
    meta = selection.meta
    return (f"{len(selection)} of {selection.total} ({selection.fraction:.2%}) by {meta['score']}, "
            f"{meta['strategy']['name']}")


def _write_selection(folder: Path, selection: Selection, source: DataSource | None) -> Path | None:
    from prunekit.evaluate.report import write_json
    from prunekit.io.atomic import write_text

    write_text(folder / INDICES_FILE, "".join(f"{i}\n" for i in selection.indices.tolist()))
    written = None
    if source is not None:
        written = source.write_subset(selection.indices, folder)
        selection.meta["written"] = written.name
    write_json(folder / SELECTION_JSON, selection.meta)
    return written


def check_scores_match(table: ScoreTable, source: DataSource) -> None:
    """Refuse to apply scores to data they were not computed on."""
    rows = len(source)
    if rows != len(table):
        raise PrunekitError(f"the scores have {len(table)} rows but {source.description} has {rows}: they were "
                            "computed on other data")
    stored = table.meta.get("data", {}).get("fingerprint", {})
    current = source.fingerprint()
    if stored.get("sha256") and current.get("sha256") and stored["sha256"] != current["sha256"]:
        raise PrunekitError(f"{source.description} differs from the data the scores were computed on "
                            f"(content hash {current['sha256'][:12]} vs {stored['sha256'][:12]})")
    labels = source.labels()
    if table.labels is not None and labels is not None and not np.array_equal(table.labels, labels):
        raise PrunekitError(f"the labels in the scores differ from the labels of {source.description}")


# ---------------------------------------------------------------------------------------------
# reports


def score_report(table: ScoreTable) -> str:
    from prunekit.evaluate.report import markdown_table

    meta = table.meta
    data, proxy = meta.get("data", {}), meta.get("proxy", {})
    lines = ["# Data-pruning scores", "",
             f"- data: {data.get('description')} ({data.get('modality')}, {len(table)} rows, "
             f"{'labelled, ' + str(len(data.get('classes') or [])) + ' classes' if data.get('labelled') else 'unlabelled'})"]
    if proxy.get("used_by"):
        lines.append(f"- proxy: {proxy.get('model')} on {proxy.get('inputs')}; {proxy.get('epochs_trained')} of "
                     f"{proxy.get('epochs')} epochs trained, batch {proxy.get('batch_size')}, {proxy.get('optimizer')} "
                     f"lr {proxy.get('lr')} (cosine), seeds {proxy.get('seeds_run')}; read by {', '.join(proxy['used_by'])}")
        accuracy = [a for a in proxy.get("train_accuracy_per_seed") or [] if a is not None]
        if accuracy:
            lines.append(f"- proxy training-set accuracy at the end: {', '.join(f'{a:.2%}' for a in accuracy)}")
    lines.append(f"- processes: {meta.get('processes')} × {meta.get('threads_per_process')} threads; seed {meta.get('seed')}")
    timings = meta.get("timings", {})
    lines.append("- time: " + ", ".join(f"{k.replace('_seconds', '')} {v:.1f} s" for k, v in timings.items()))
    lines += ["", "| score | what | harder |", "|---|---|---|"]
    for name, info in meta.get("scores", {}).items():
        settings = ", ".join(f"{k}={v}" for k, v in info.get("settings", {}).items())
        lines.append(f"| {name}{' (' + settings + ')' if settings else ''} | {info.get('summary')} | {info.get('harder')} |")
    lines += ["", markdown_table(["score", "harder", "mean", "std", "min", "median", "max"], summary_rows(table))]
    if len(table.names) > 1:
        correlations = rank_correlations(table)
        lines += ["", "Spearman rank correlation between scores:", "",
                  markdown_table(["", *table.names], [[a, *(correlations[a][b] for b in table.names)] for a in table.names])]
    return "\n".join(lines) + "\n"


def selection_report(selection: Selection, written: Path | None) -> str:
    meta = selection.meta
    strategy = meta["strategy"]
    settings = ", ".join(f"{k}={v}" for k, v in strategy.items() if k != "name")
    lines = ["# Selection", "",
             f"- kept {meta['kept']} of {meta['total']} examples ({meta['kept_fraction']:.2%}) by {meta['score']} "
             f"({meta['harder']} = harder), strategy {strategy['name']}{' (' + settings + ')' if settings else ''}, "
             f"class balance {meta['balance']}, seed {meta['seed']}",
             f"- mean {meta['score']}: kept {meta['score_mean_kept']:.4g}"
             + (f", dropped {meta['score_mean_dropped']:.4g}" if meta.get("score_mean_dropped") is not None else "")]
    for key, value in (meta.get("strategy_notes") or {}).items():
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    if "per_class" in meta:
        per_class = meta["per_class"]
        names = meta.get("class_names") or {}
        lines.append("- per class (kept / total): " + ", ".join(f"{names.get(c, c)}: {v['kept']}/{v['total']}"
                                                               for c, v in per_class.items()))
    lines.append(f"- indices: {INDICES_FILE}" + (f"; selected rows: {written.name}" if written else ""))
    return "\n".join(lines) + "\n"


def describe_methods() -> dict[str, list[dict[str, Any]]]:
    def settings(cls) -> dict[str, Any]:
        return {name: (None if field.is_required() else field.default) for name, field in cls.model_fields.items()}

    return {"scores": [{"name": n, "summary": SCORES.get(n).summary, "harder": SCORES.get(n).harder,
                        "needs_labels": "labels" in SCORES.get(n).needs, "needs": sorted(SCORES.get(n).needs),
                        "settings": settings(SCORES.get(n))}
                       for n in SCORES.names()],
            "strategies": [{"name": n, "summary": STRATEGIES.get(n).summary, "settings": settings(STRATEGIES.get(n))}
                           for n in STRATEGIES.names()]}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)

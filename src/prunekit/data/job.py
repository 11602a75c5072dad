"""The jobs behind ``prunekit data score | select | prune``: validate, compute, write atomically, report.

Everything is checked before any work starts (outputs, data, score names and settings); outputs
appear whole or not at all; only process 0 of a ``torchrun`` group writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.data.base import SCORES, STRATEGIES
from prunekit.core.distributed import ProcessGroup, current_group
from prunekit.data.proxy import ProxyConfig
from prunekit.data.scoring import make_score, score_data
from prunekit.data.selection import Selection, select
from prunekit.data.sources import DataSource, open_data
from prunekit.data.table import ScoreTable, rank_correlations, summary_rows
from prunekit.errors import PrunekitError

INDICES_FILE = "indices.txt"
SELECTION_JSON = "selection.json"
REPORT_MD = "report.md"


@dataclass
class DataOptions:
    """How to read the user's data (the command line's reading options)."""

    text_field: str | None = "text"
    label_field: str | None = "auto"
    features: list[str] | None = None
    text_unit: str = "line"
    input_key: str | None = None
    limit: int | None = None

    def open(self, data: Any) -> DataSource:
        return open_data(data, text_field=self.text_field, label_field=self.label_field, features=self.features,
                         text_unit=self.text_unit, input_key=self.input_key, limit=self.limit)


@dataclass
class SelectOptions:
    score: str | None = None
    keep: float | None = None
    count: int | None = None
    strategy: str = "hardest"
    balance: str = "none"
    seed: int = 0
    settings: dict[str, Any] | None = None


def _input_path(data: Any) -> Path | None:
    if isinstance(data, (str, Path)) and Path(str(data)).expanduser().exists():
        return Path(str(data)).expanduser()
    return None


def _check_out(out: Path, overwrite: bool, inputs: tuple) -> Path:
    from prunekit.io.atomic import check_output_dir

    return check_output_dir(out, overwrite, inputs)


def _validate_select(options: SelectOptions, requested_scores: list[str] | None = None) -> None:
    """Catch a bad selection before hours of scoring."""
    from prunekit.data.selection import BALANCES, kept_count

    if options.keep is not None or options.count is None:
        kept_count(1, options.keep, options.count)  # checks the fraction (and that exactly one is given)
    elif isinstance(options.count, bool) or not isinstance(options.count, int) or options.count < 1:
        raise PrunekitError(f"the kept count must be a whole number of at least 1, got {options.count!r}")
    if options.balance not in BALANCES:
        raise PrunekitError(f"class balance must be one of {', '.join(BALANCES)}, got '{options.balance}'")
    STRATEGIES.build(options.strategy, **(options.settings or {}))
    if requested_scores is not None and options.score is not None and options.score not in requested_scores:
        raise PrunekitError(f"--select-by {options.score} is not among the computed scores: {', '.join(requested_scores)}")


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


def run_score_job(data: Any, scores: list, out: Path, overwrite: bool = False, options: DataOptions | None = None,
                  proxy: ProxyConfig | None = None, seed: int = 0, encoder: str | None = None,
                  text_batch_size: int = 16, select_options: SelectOptions | None = None,
                  world: ProcessGroup | None = None) -> tuple[ScoreTable, Selection | None, Path]:
    """Score (and, with ``select_options``, select and write the pruned data) into ``out``."""
    from prunekit.io.atomic import atomic_directory

    world = world or current_group()
    options = options or DataOptions()
    specs = [make_score(s) for s in scores]
    if select_options is not None:
        _validate_select(select_options, [s.name for s in specs])
    out_path = _check_out(out, overwrite, (_input_path(data),))
    source = options.open(data)
    table = score_data(source, specs, proxy=proxy, seed=seed, encoder=encoder, text_batch_size=text_batch_size,
                       world=world)
    selection = None
    if select_options is not None:
        selection = _select(table, select_options)
    if world.is_writer:
        with atomic_directory(out_path, overwrite=overwrite) as tmp:
            table.write(tmp)
            written = None
            if selection is not None:
                written = _write_selection(tmp, selection, source)
            (tmp / REPORT_MD).write_text(score_report(table) + ("" if selection is None else
                                                                "\n" + selection_report(selection, written)))
    world.barrier()
    return table, selection, out_path


def _select(table: ScoreTable, options: SelectOptions) -> Selection:
    selection = select(table, options.score, keep=options.keep, count=options.count, strategy=options.strategy,
                       balance=options.balance, seed=options.seed, **(options.settings or {}))
    classes = table.meta.get("data", {}).get("classes")
    if classes and "per_class" in selection.meta:
        selection.meta["class_names"] = {i: str(name) for i, name in enumerate(classes)}
    return selection


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


def run_select_job(scores: Path, out: Path, options: SelectOptions, data: Any = None,
                   data_options: DataOptions | None = None, overwrite: bool = False) -> tuple[Selection, Path]:
    """Select from a scores file; with ``data``, also write the selected rows in the data's format."""
    from prunekit.io.atomic import atomic_directory

    _validate_select(options)
    scores_path = Path(scores).expanduser()
    out_path = _check_out(out, overwrite, (scores_path, _input_path(data)))
    table = ScoreTable.read(scores_path)
    source = None
    if data is not None:
        source = (data_options or DataOptions()).open(data)
        check_scores_match(table, source)
    selection = _select(table, options)
    with atomic_directory(out_path, overwrite=overwrite) as tmp:
        written = _write_selection(tmp, selection, source)
        (tmp / REPORT_MD).write_text(selection_report(selection, written))
    return selection, out_path


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

"""Score every example of a data set: proxy runs per seed, passes over the data, data-parallel.

:func:`score_data` is the one call behind ``prunekit data score``. It opens the data, checks
that every score can run on it (labels, modality), trains one proxy run per seed that feeds all
proxy scores at once, runs the pass scores, and returns a :class:`ScoreTable`. Under
``torchrun`` (or any initialised process group) seeds and batches are shared out between the
processes and the result is the same as with one process.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from prunekit.core.progress import progress_bar
from prunekit.data.base import SCORES, Score
from prunekit.core.distributed import ProcessGroup, current_group
from prunekit.data.proxy import ProxyConfig, ProxyRun, standardize
from prunekit.data.sources import IMAGE, TABULAR, TEXT, DataSource, open_data
from prunekit.data.table import ScoreTable
from prunekit.errors import PrunekitError

ScoreSpec = str | Score | tuple[str, dict[str, Any]] | Mapping[str, Any]


@dataclasses.dataclass
class ScoringContext:
    """What a score sees: the data, its labels, the proxy settings and the process group."""

    source: DataSource
    world: ProcessGroup
    labels: np.ndarray | None
    num_classes: int | None
    proxy: ProxyConfig
    seed: int = 0
    text_batch_size: int = 16
    encoder: str | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.source)

    @property
    def modality(self) -> str:
        return self.source.modality

    def map_texts(self, fn: Callable[[list[str]], np.ndarray], description: str,
                  batch_size: int | None = None) -> np.ndarray:
        """``fn`` over consecutive batches of texts, batches shared out between processes, rows in order.

        Every process streams the whole source but computes only its own batches, so a batch
        has the same rows (and the same padding) whatever the number of processes.
        """
        size = batch_size or self.text_batch_size
        local: dict[int, np.ndarray] = {}
        with progress_bar(description, self.count) as bar:
            for number, batch in enumerate(self.source.text_batches(size)):
                if self.world.owns(number):
                    values = np.asarray(fn(batch))
                    if values.shape[0] != len(batch):
                        raise RuntimeError(f"{description}: {values.shape[0]} results for {len(batch)} texts")
                    local[number] = values
                bar.advance(len(batch))
        merged = self.world.merge(local)
        if not merged:
            raise PrunekitError(f"{self.source.description} has no text")
        return np.concatenate([merged[number] for number in sorted(merged)])

    def embeddings(self, encoder: str | None = None) -> np.ndarray:
        """Sentence embeddings of every text (computed once per encoder, data-parallel)."""
        from prunekit.data.embeddings import embed_texts

        key = f"embeddings:{encoder or self.encoder or 'minilm'}"
        if key not in self.cache:
            started = time.perf_counter()
            chosen = encoder or self.encoder
            self.cache[key] = self.map_texts(lambda texts: embed_texts(texts, chosen), "Embedding texts",
                                             batch_size=max(self.text_batch_size, 32))
            self.timings["embedding_seconds"] = time.perf_counter() - started
        return self.cache[key]

    def proxy_inputs(self) -> torch.Tensor:
        """What the proxy model trains on: images, feature vectors, or the sentence embeddings of texts."""
        if "proxy_inputs" not in self.cache:
            inputs = (torch.from_numpy(self.embeddings()) if self.modality == TEXT else self.source.inputs())
            standardise = self.proxy.standardize if self.proxy.standardize is not None else self.proxy.builtin
            self.cache["proxy_inputs"] = standardize(inputs) if standardise else inputs
        return self.cache["proxy_inputs"]


def make_score(spec: ScoreSpec) -> Score:
    """A score from its name, ``(name, settings)``, ``{name: settings}``, or a Score passed through."""
    if isinstance(spec, tuple):
        name, settings = spec
        spec = {"name": name, **settings}
    if not isinstance(spec, (str, Mapping, Score)):
        raise PrunekitError(f"cannot use {type(spec).__name__} as a score; give its name")
    return SCORES.build(spec)


def score_data(data: Any, scores: Sequence[ScoreSpec] | ScoreSpec, labels: Any = None, *,
               proxy: ProxyConfig | None = None, seed: int = 0, text_batch_size: int = 16,
               encoder: str | None = None, world: ProcessGroup | None = None, **source_options) -> ScoreTable:
    """Score every example of ``data`` with each of ``scores`` (names, ``(name, settings)``, ``{name: settings}``
    or Score objects).

    >>> table = score_data("fashion-mnist", ["el2n", "forgetting"], proxy=ProxyConfig(epochs=3, seeds=3))
    >>> table.scores["el2n"][:5]
    """
    started = time.perf_counter()
    source = open_data(data, labels, **source_options)
    world = world or current_group()
    proxy = proxy or ProxyConfig()
    specs = [make_score(s) for s in ([scores] if isinstance(scores, (str, Score, tuple, Mapping)) else list(scores))]
    if not specs:
        raise PrunekitError("give at least one score")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PrunekitError(f"a score is listed twice: {', '.join(names)}")
    label_ids = source.labels()
    classes = source.classes()
    count = len(source)
    for spec in specs:
        if "labels" in spec.needs and label_ids is None:
            raise PrunekitError(f"score '{spec.name}' needs labels, but {source.description} has none "
                                "(name the label column with --label-field)")
    context = ScoringContext(source, world, label_ids, None if classes is None else len(classes), proxy, seed,
                             text_batch_size, encoder)
    proxy_scores = [s for s in specs if s.uses_proxy(context)]
    pass_scores = [s for s in specs if not s.uses_proxy(context)]
    if proxy_scores:
        if proxy.train and label_ids is None:
            raise PrunekitError(f"score '{proxy_scores[0].name}' trains a proxy model on the labels, but "
                                f"{source.description} has none; give labels or an already trained model")
        if proxy.train and context.num_classes is not None and context.num_classes < 2:
            raise PrunekitError(f"{source.description} has a single class; proxy training needs at least two")
    columns: dict[str, np.ndarray] = {}
    proxy_info: dict[str, Any] = {}
    if proxy_scores:
        proxy_started = time.perf_counter()
        columns.update(_run_proxies(context, proxy_scores, proxy_info))
        context.timings["proxy_seconds"] = time.perf_counter() - proxy_started - context.timings.get("embedding_seconds", 0.0)
    for spec in pass_scores:
        pass_started = time.perf_counter()
        columns[spec.name] = np.asarray(spec.compute(context), dtype=np.float64)
        context.timings[f"{spec.name}_seconds"] = time.perf_counter() - pass_started
    ordered = {name: columns[name] for name in names}
    for name, values in ordered.items():
        if values.shape != (count,):
            raise RuntimeError(f"score {name} returned shape {values.shape} for {count} examples")
        if not np.isfinite(values).all():
            raise PrunekitError(f"score '{name}' is not finite for {int((~np.isfinite(values)).sum())} examples; "
                                "the proxy training diverged (lower the learning rate) or the data holds NaN")
    context.timings["total_seconds"] = time.perf_counter() - started
    meta = {
        "data": {**source.info(), "fingerprint": source.fingerprint(), "classes": classes},
        "scores": {s.name: s.describe() for s in specs},
        "proxy": {**proxy.describe(), "used_by": [s.name for s in proxy_scores],
                  "inputs": _proxy_input_description(context) if proxy_scores else None, **proxy_info},
        "seed": seed,
        "processes": world.world_size,
        "threads_per_process": torch.get_num_threads(),
        "timings": dict(context.timings),
    }
    return ScoreTable(ordered, label_ids, source.label_values(), meta)


def _proxy_input_description(context: ScoringContext) -> str:
    if context.modality == TEXT:
        return f"sentence embeddings ({context.encoder or 'all-MiniLM-L6-v2'})"
    kind = {IMAGE: "images", TABULAR: "feature vectors"}[context.modality]
    standardised = context.proxy.standardize if context.proxy.standardize is not None else context.proxy.builtin
    return kind + (", standardised" if standardised else "")


def _run_proxies(context: ScoringContext, scores: list[Score], info: dict[str, Any]) -> dict[str, np.ndarray]:
    """One proxy run per seed (seeds shared out between processes), every proxy score hooked into each."""
    proxy, world = context.proxy, context.world
    inputs = context.proxy_inputs()
    labels = None if context.labels is None else torch.from_numpy(context.labels)
    stop = max(s.epochs_needed(proxy.epochs) for s in scores) if proxy.train else 0
    stop = min(stop, proxy.epochs)
    seeds = proxy.seed_list if proxy.train else proxy.seed_list[:1]
    num_classes = context.num_classes or 0
    local: dict[int, dict[str, Any]] = {}
    for unit, seed in enumerate(seeds):
        if not world.owns(unit):
            continue
        run = ProxyRun(proxy, inputs, labels, num_classes, seed, stop)
        finishers = {s.name: s.attach(run) for s in scores}
        accuracy: list[float] = []
        if labels is not None:
            run.at_end(lambda r, into=accuracy: into.append(float((r.outputs()[0].argmax(1) == labels).float().mean())))
        run.run()
        local[unit] = {"scores": {name: np.asarray(f(), dtype=np.float64) for name, f in finishers.items()},
                       "train_accuracy": accuracy[0] if accuracy else None,
                       "epoch_losses": list(run.history.losses) if run.history else []}
    merged = world.merge(local)
    info["seeds_run"] = seeds
    info["epochs_trained"] = stop
    info["train_accuracy_per_seed"] = [merged[u]["train_accuracy"] for u in range(len(seeds))]
    info["epoch_losses_per_seed"] = [merged[u]["epoch_losses"] for u in range(len(seeds))]
    return {s.name: np.asarray(s.finish(np.stack([merged[u]["scores"][s.name] for u in range(len(seeds))]),
                                        context.labels), dtype=np.float64)
            for s in scores}


def list_scores() -> Iterable[type[Score]]:
    return (SCORES.get(name) for name in SCORES.names())

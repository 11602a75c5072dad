"""Zero-shot task accuracy with lm-evaluation-harness, on tasks built offline from the wiki protocol's test articles.

No hub data is reachable here, so the tasks are made from the test part of the pinned ``wiki`` text
(``core.text``: the last 20 % of articles, never seen by calibration), deterministically from a seed, written
as local jsonl with lm-eval task YAML beside them, and scored by lm-eval's own ``HFLM`` on the in-memory model:

- ``wiki_lastword`` (LAMBADA-style): a passage of up to ``CONTEXT_WORDS`` words (an article's prose paragraphs
  in order, tables and headings dropped) ending just before the last word of a sentence; the model must produce
  that word (`` word``). Only words of four or more letters that already occur earlier in the passage are asked,
  as LAMBADA keeps words the wider context makes predictable. Metric: ``acc``, the target is the greedy
  continuation (lm-eval's ``loglikelihood`` ``is_greedy``); chance is about 0.
- ``wiki_continuation`` (multiple choice): a passage of ``MC_CONTEXT_WORDS`` words of one paragraph; the choices
  are its true next ``MC_CHOICE_WORDS`` words and three spans of the same length from other test articles, in
  seeded random order. Metric: ``acc`` (highest log-likelihood) and ``acc_norm`` (per byte); chance is 25 %.

Accuracies come with lm-eval's standard error of the mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from prunekit.core.cache import cache_dir
from prunekit.core.config import RecipeModel
from prunekit.core.progress import status
from prunekit.errors import PrunekitError

LASTWORD = "wiki_lastword"
CONTINUATION = "wiki_continuation"
TASKS = (LASTWORD, CONTINUATION)
TASK_FORMAT_VERSION = 2  # bump when the construction changes: cached task files are keyed by it
CONTEXT_WORDS = 120
MIN_CONTEXT_WORDS = 40
MC_CONTEXT_WORDS = 48
MC_CHOICE_WORDS = 16
_WORD = re.compile(r"[A-Za-z]{4,}")
_PROSE_LINE = re.compile(r"^[A-Z][^|{}=<>*#\[\]]{60,}$")  # a paragraph of prose, not a table or heading remnant


class TaskSettings(RecipeModel):
    """The recipe key ``tasks``: which zero-shot tasks to score, on how many examples, from which seed."""

    names: list[str] = Field(default_factory=list, description=f"zero-shot tasks: {', '.join(TASKS)}; none = skip")
    examples: int = Field(200, ge=1, description="examples per task")
    seed: int = 0
    batch_size: int = Field(8, ge=1)

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return list(check_tasks(value))

    def protocol(self, split: float = 0.8) -> "TaskProtocol":
        return TaskProtocol(tuple(self.names), self.examples, self.seed, split, self.batch_size)


@dataclass(frozen=True)
class TaskProtocol:
    """Which tasks, how many examples each, from which seed and split of the wiki text."""

    tasks: tuple[str, ...] = TASKS
    examples: int = 200
    seed: int = 0
    split: float = 0.8
    batch_size: int = 8

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks), "source": f"wiki test articles (last {1 - self.split:.0%})",
                "harness": _harness_version(), "definitions": {name: DEFINITIONS[name] for name in self.tasks}}


DEFINITIONS = {
    LASTWORD: (f"LAMBADA-style: a passage of up to {CONTEXT_WORDS} words (an article's prose paragraphs in order) "
               "ending before the last word of a sentence; acc = that word (4+ letters, seen earlier in the passage) "
               "is the greedy continuation; chance ~0"),
    CONTINUATION: (f"multiple choice: a {MC_CONTEXT_WORDS}-word passage, its true next {MC_CHOICE_WORDS} words vs "
                   "three same-length spans from other test articles; acc = highest log-likelihood, acc_norm = per "
                   "byte; chance 25 %"),
}


def check_tasks(names) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise PrunekitError(f"unknown task {', '.join(unknown)}; choose from: {', '.join(TASKS)}")
    return names


def _harness_version() -> str | None:
    try:
        from importlib.metadata import version

        return f"lm-eval {version('lm-eval')}"
    except Exception:  # noqa: BLE001 - not installed: the evaluation itself says so
        return None


def _paragraphs(article: str) -> list[list[str]]:
    return [line.split() for line in article.splitlines() if _PROSE_LINE.match(line.strip())]


def lastword_examples(articles: list[str], count: int, seed: int) -> list[dict[str, str]]:
    """Passages ending before a sentence's last word, that word seen earlier in the passage."""
    candidates = []
    for article in articles:
        words = [word for paragraph in _paragraphs(article) for word in paragraph]
        for index in range(MIN_CONTEXT_WORDS, len(words)):
            word = words[index]
            match = re.fullmatch(r"([A-Za-z]{4,})[.!?]", word)
            if not match:
                continue
            context = words[max(0, index - CONTEXT_WORDS):index]
            if match.group(1) in {w.strip(".,;:!?()\"'") for w in context}:
                candidates.append({"context": " ".join(context), "target": " " + match.group(1)})
    return _sample(candidates, count, seed, LASTWORD)


def continuation_examples(articles: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    """A passage, its true continuation and three from other test articles, shuffled by the seed."""
    rng = random.Random(seed)
    # (article, words of one paragraph): a passage and its continuation never cross a dropped table or heading
    paragraphs = [(a, words) for a, article in enumerate(articles) for words in _paragraphs(article)]
    length = MC_CONTEXT_WORDS + MC_CHOICE_WORDS
    starts = [(p, s) for p, (_, words) in enumerate(paragraphs) for s in range(0, len(words) - length + 1, length)]
    others = [(p, s) for p, (_, words) in enumerate(paragraphs)
              for s in range(0, len(words) - MC_CHOICE_WORDS + 1, MC_CHOICE_WORDS)]
    if len({paragraphs[p][0] for p, _ in starts}) < 2:
        raise PrunekitError("the wiki test articles hold too little prose for the continuation task")
    examples = []
    for paragraph, start in _sample(starts, count, seed, CONTINUATION):
        article, words = paragraphs[paragraph]
        true = " ".join(words[start + MC_CONTEXT_WORDS:start + length])
        distractors = []
        while len(distractors) < 3:
            other, at = others[rng.randrange(len(others))]
            if paragraphs[other][0] != article:
                distractors.append(" ".join(paragraphs[other][1][at:at + MC_CHOICE_WORDS]))
        choices = [true, *distractors]
        rng.shuffle(choices)
        examples.append({"context": " ".join(words[start:start + MC_CONTEXT_WORDS]),
                         "choices": [" " + choice for choice in choices], "label": choices.index(true)})
    return examples


def _sample(candidates: list, count: int, seed: int, task: str) -> list:
    if len(candidates) < count:
        raise PrunekitError(f"{task}: the wiki test articles give {len(candidates)} examples, fewer than the "
                            f"{count} asked; ask for fewer (--task-examples)")
    return random.Random(f"{task}:{seed}").sample(candidates, count)


_YAML = {
    LASTWORD: {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    CONTINUATION: {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{label}}",
                   "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
}


def task_directory(protocol: TaskProtocol) -> Path:
    """The tasks' jsonl data and lm-eval YAML, built once per protocol and kept in the user cache."""
    from prunekit.core.text import wiki_articles_of

    key = json.dumps({"version": TASK_FORMAT_VERSION, "examples": protocol.examples, "seed": protocol.seed,
                      "split": protocol.split}, sort_keys=True)
    directory = cache_dir("tasks") / hashlib.sha256(key.encode()).hexdigest()[:16]
    if all((directory / f"{name}.yaml").exists() for name in TASKS):
        return directory
    articles = list(wiki_articles_of("test", protocol.split))
    builders = {LASTWORD: lastword_examples, CONTINUATION: continuation_examples}
    directory.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        data = directory / f"{name}.jsonl"
        rows = builders[name](articles, protocol.examples, protocol.seed)
        scratch = data.with_suffix(".jsonl.tmp")
        scratch.write_text("".join(json.dumps(row) + "\n" for row in rows))
        scratch.replace(data)
        config = {"task": f"prunekit_{name}", "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **_YAML[name],
                  "metadata": {"version": TASK_FORMAT_VERSION}}
        import yaml

        scratch = directory / f"{name}.yaml.tmp"
        scratch.write_text(yaml.safe_dump(config, sort_keys=False))
        scratch.replace(directory / f"{name}.yaml")
    return directory


def evaluate_tasks(model, tokenizer, protocol: TaskProtocol, what: str = "Tasks") -> dict[str, dict[str, Any]]:
    """Each task's accuracy with its standard error (and acc_norm where the task has it), scored by lm-eval."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PrunekitError("task evaluation needs lm-evaluation-harness: pip install 'prunekit[eval]'") from None
    import logging

    directory = task_directory(protocol)
    device = str(next(model.parameters()).device)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with status(f"{what}: {', '.join(protocol.tasks)} ({protocol.examples} examples each, lm-eval)"), _quiet():
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=protocol.batch_size, device=device)
        manager = TaskManager(include_path=str(directory), include_defaults=False, verbosity="ERROR")
        output = lm_eval.simple_evaluate(model=harness, tasks=[f"prunekit_{name}" for name in protocol.tasks],
                                         task_manager=manager, num_fewshot=0, log_samples=False,
                                         bootstrap_iters=1000, random_seed=protocol.seed,
                                         numpy_random_seed=protocol.seed, torch_random_seed=protocol.seed,
                                         fewshot_random_seed=protocol.seed, verbosity="ERROR")
    results = {}
    for name in protocol.tasks:
        row = output["results"][f"prunekit_{name}"]
        entry = {"accuracy": row["acc,none"], "stderr": row["acc_stderr,none"], "examples": protocol.examples,
                 "chance": 0.25 if name == CONTINUATION else 0.0}
        if "acc_norm,none" in row:
            entry.update(accuracy_norm=row["acc_norm,none"], stderr_norm=row["acc_norm_stderr,none"])
        results[name] = entry
    return results


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets draw their own progress bars; prunekit's status line says what runs."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def task_rows(before: dict | None, after: dict | None) -> list[tuple[str, str]]:
    """Rows for Markdown and the terminal: each task's accuracy ± standard error, before → after."""
    def cell(entry: dict, norm: bool) -> str:
        key, err = ("accuracy_norm", "stderr_norm") if norm else ("accuracy", "stderr")
        return f"{entry[key]:.1%} ± {entry[err]:.1%}"

    rows = []
    for name, entry in (after or before or {}).items():
        for norm in (False, True) if "accuracy_norm" in entry else (False,):
            cells = [cell(results[name], norm) for results in (before, after) if results]
            rows.append((f"{name} {'acc_norm' if norm else 'acc'}", " → ".join(cells)))
    return rows

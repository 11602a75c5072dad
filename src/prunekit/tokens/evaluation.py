"""Quality and speed of token reduction, under protocols pinned here and printed in every report.

Three tasks, one per kind of model: image classification (Fashion-MNIST accuracy), text embedding
(cosine of the pooled embedding to the unreduced model's, on Wikipedia paragraphs) and prefill
(perplexity of a continuation after a pruned prompt, and the prefill's speed). ``run_sweep``
applies methods at several ratios and measures each against the unpatched model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_flops, machine_load, measure_paired, measure_throughput
from prunekit.tokens.patch import TokenPatch, apply


# ----- protocols ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageProtocol:
    split: str = "test"
    limit: int | None = None  # None: the whole split

    def describe(self) -> dict[str, Any]:
        images = "every image" if self.limit is None else f"the first {self.limit} images"
        return {**asdict(self), "text": f"Fashion-MNIST {self.split} split, {images} in file order; accuracy = "
                                        "share of images whose highest logit is the true class"}


@dataclass(frozen=True)
class PassageProtocol:
    min_tokens: int = 128
    max_tokens: int = 256
    count: int = 256
    split: float = 0.8

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "text": (
            f"the first {self.count} paragraphs of the wiki test articles (the last {1 - self.split:.0%} of articles, "
            f"in file order) whose tokenized length, special tokens included, is {self.min_tokens} to "
            f"{self.max_tokens}; embedding = mean of the final hidden states over real tokens (each token weighted "
            "by how many original tokens it stands for), L2-normalised; fidelity = cosine to the unpatched model's "
            "embedding of the same paragraph")}


@dataclass(frozen=True)
class PrefillProtocol:
    prompt_tokens: int = 384
    continuation_tokens: int = 128
    windows: int = 16
    split: float = 0.8

    def describe(self) -> dict[str, Any]:
        total = self.prompt_tokens + self.continuation_tokens
        return {**asdict(self), "text": (
            f"the first {self.windows} non-overlapping windows of {total} tokens of the wiki test text (the last "
            f"{1 - self.split:.0%} of articles, tokenized whole); each window's first {self.prompt_tokens} tokens are "
            "the prompt, prefilled through the patched model (its tokens pruned), and the remaining "
            f"{self.continuation_tokens} the continuation, fed on top of the prefill's key/value cache; perplexity = "
            "exp of the mean over windows of the mean loss of the continuation tokens (the first one predicted by "
            "the prompt's last logits)")}


def wiki_passages(tokenizer, protocol: PassageProtocol) -> list[str]:
    from prunekit.core.text import wiki_split

    _calibration, test = wiki_split(protocol.split)
    chosen = []
    for paragraph in (p.strip() for p in test.split("\n\n")):
        if not paragraph:
            continue
        length = len(tokenizer(paragraph, truncation=False)["input_ids"])
        if protocol.min_tokens <= length <= protocol.max_tokens:
            chosen.append(paragraph)
            if len(chosen) == protocol.count:
                return chosen
    raise PrunekitError(f"the wiki test articles hold only {len(chosen)} paragraphs of {protocol.min_tokens} to "
                        f"{protocol.max_tokens} tokens; ask for at most {len(chosen)}")


# ----- tasks -------------------------------------------------------------------------------------
def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _cache_argument(model: nn.Module, output: Any) -> dict[str, Any]:
    """The key/value cache of ``output`` as the keyword ``model`` takes it: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before."""
    import inspect

    cache = output.get("cache") if output.get("cache") is not None else output.get("past_key_values")
    accepts_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache" if accepts_cache else "past_key_values": cache}


class Task:
    """One way of judging a model: a quality metric and a fixed batch to time."""

    kind: str
    metric: str
    higher_is_better: bool = True

    def quality(self, model: nn.Module, patch: TokenPatch | None) -> dict[str, float]:
        raise NotImplementedError

    def runner(self, model: nn.Module, batch_size: int) -> Callable[[], Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ImageClassification(Task):
    kind = "image classification"
    metric = "accuracy"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, protocol: ImageProtocol, batch_size: int = 250):
        self.images, self.labels, self.protocol, self.batch_size = images, labels, protocol, batch_size

    @classmethod
    def fashion_mnist(cls, protocol: ImageProtocol = ImageProtocol()) -> "ImageClassification":
        from prunekit.models.fashion_mnist import load_fashion_mnist

        data = load_fashion_mnist(protocol.split, protocol.limit)
        return cls(data.images, data.labels, protocol)

    def quality(self, model: nn.Module, patch: TokenPatch | None) -> dict[str, float]:
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(self.labels), self.batch_size):
                logits = _logits(model(self.images[start:start + self.batch_size]))
                correct += int((logits.argmax(dim=-1) == self.labels[start:start + self.batch_size]).sum())
        return {"accuracy": correct / len(self.labels), "correct": correct, "images": len(self.labels)}

    def runner(self, model: nn.Module, batch_size: int) -> Callable[[], Any]:
        if batch_size > len(self.images):
            raise PrunekitError(f"batch size {batch_size} exceeds the {len(self.images)} evaluation images")
        batch = self.images[:batch_size].contiguous()
        return lambda: model(batch)

    def describe(self) -> dict[str, Any]:
        return self.protocol.describe()


class TextEmbedding(Task):
    kind = "text embedding"
    metric = "cosine"

    def __init__(self, tokenizer, passages: Sequence[str], protocol: PassageProtocol, batch_size: int = 32):
        self.tokenizer, self.passages, self.protocol, self.batch_size = tokenizer, list(passages), protocol, batch_size
        self._reference: torch.Tensor | None = None

    @classmethod
    def wiki(cls, tokenizer, protocol: PassageProtocol = PassageProtocol()) -> "TextEmbedding":
        return cls(tokenizer, wiki_passages(tokenizer, protocol), protocol)

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.protocol.max_tokens,
                              return_tensors="pt")

    def embed(self, model: nn.Module, patch: TokenPatch | None) -> torch.Tensor:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(self.passages), self.batch_size):
                encoded = self._encode(self.passages[start:start + self.batch_size])
                hidden = model(**encoded).last_hidden_state
                if patch is not None:
                    pooled = patch.pool(hidden)
                else:
                    weights = encoded["attention_mask"].to(hidden.dtype)[..., None]
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
                rows.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(rows)

    def quality(self, model: nn.Module, patch: TokenPatch | None) -> dict[str, float]:
        embeddings = self.embed(model, patch)
        if patch is None:
            self._reference = embeddings
        if self._reference is None:
            raise RuntimeError("measure the unpatched model first: it is the reference")
        cosine = (embeddings * self._reference).sum(dim=-1)
        return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "cosine_p05": float(torch.quantile(cosine, 0.05)), "passages": len(self.passages)}

    def runner(self, model: nn.Module, batch_size: int) -> Callable[[], Any]:
        if batch_size > len(self.passages):
            raise PrunekitError(f"batch size {batch_size} exceeds the {len(self.passages)} evaluation passages")
        encoded = self._encode(self.passages[:batch_size])
        return lambda: model(**encoded)

    def describe(self) -> dict[str, Any]:
        return self.protocol.describe()


class Prefill(Task):
    kind = "prefill"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, windows: torch.Tensor, protocol: PrefillProtocol, batch_size: int = 4, tokenizer=None):
        self.windows, self.protocol, self.batch_size, self.tokenizer = windows, protocol, batch_size, tokenizer

    @classmethod
    def wiki(cls, tokenizer, protocol: PrefillProtocol = PrefillProtocol()) -> "Prefill":
        from prunekit.core.text import consecutive_windows, tokenize, wiki_split

        _calibration, test = wiki_split(protocol.split)
        length = protocol.prompt_tokens + protocol.continuation_tokens
        return cls(consecutive_windows(tokenize(tokenizer, test), protocol.windows, length), protocol,
                   tokenizer=tokenizer)

    def quality(self, model: nn.Module, patch: TokenPatch | None) -> dict[str, float]:
        split = self.protocol.prompt_tokens
        losses: list[float] = []
        kept: list[float] = []
        with torch.inference_mode():
            for start in range(0, self.windows.shape[0], self.batch_size):
                window = self.windows[start:start + self.batch_size]
                prompt, continuation = window[:, :split], window[:, split:]
                first = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                if patch is not None:
                    kept.append(patch.trace.tokens_out)
                rest = model(input_ids=continuation[:, :-1], use_cache=True, **_cache_argument(model, first))
                logits = torch.cat([first.logits[:, -1:], rest.logits], dim=1).float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), continuation.reshape(-1), reduction="none")
                losses.extend(loss.view(window.shape[0], -1).mean(dim=1).tolist())
        mean = sum(losses) / len(losses)
        if not math.isfinite(mean):
            raise PrunekitError("the model produced NaN or inf losses")
        result = {"perplexity": math.exp(mean), "mean_loss": mean, "windows": len(losses)}
        if kept:
            result["prompt_tokens_kept"] = sum(kept) / len(kept)
        return result

    def runner(self, model: nn.Module, batch_size: int) -> Callable[[], Any]:
        if batch_size > self.windows.shape[0]:
            raise PrunekitError(f"batch size {batch_size} exceeds the {self.windows.shape[0]} evaluation windows")
        prompt = self.windows[:batch_size, :self.protocol.prompt_tokens].contiguous()
        return lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1)

    def describe(self) -> dict[str, Any]:
        return self.protocol.describe()


# ----- sweeps ------------------------------------------------------------------------------------
@dataclass
class SweepSettings:
    methods: list[str]
    ratios: list[float]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 3
    repeats: int = 10
    layers: list[int] | None = None
    seed: int = 0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method settings (the ratio aside)
    threads: int | None = None

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "timing": (f"one batch, timed in {self.repeats} pairs of one patched and one unpatched "
                                           f"pass in alternating order after {self.warmup} untimed pairs; "
                                           "speed-up = median unpatched time / median patched time")}


def measure_point(model: nn.Module, task: Task, settings: SweepSettings, patch: TokenPatch | None) -> dict[str, Any]:
    quality = task.quality(model, patch)
    tokens = patch.trace.to_dict() if patch is not None else None
    speed = {}
    flops_per_item = None
    for size in settings.batch_sizes:
        run = task.runner(model, size)
        load = machine_load()
        if patch is None:
            measured = measure_throughput(run, size, settings.warmup, settings.repeats)
            speed[str(size)] = {"items_per_second": measured.items_per_second,
                                "median_seconds": measured.median_seconds}
        else:
            paired = measure_paired(run, size, patch.install, patch.remove, settings.warmup, settings.repeats)
            speed[str(size)] = {"items_per_second": paired.items_per_second,
                                "median_seconds": size / paired.items_per_second,
                                "unpatched_items_per_second": paired.baseline_items_per_second,
                                "speedup": paired.speedup}
        speed[str(size)].update(load_before=load, load_after=machine_load())
        if flops_per_item is None:
            flops_per_item = count_flops(run) / size
    if patch is not None:  # the trace of the last timed pass: the largest batch
        tokens = patch.trace.to_dict()
    return {"quality": quality, "throughput": speed, "flops_per_item": flops_per_item, "tokens": tokens}


def run_sweep(model: nn.Module, task: Task, settings: SweepSettings,
              on_point: Callable[[dict[str, Any]], None] | None = None,
              baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure the unpatched model, then every method at every ratio; returns the report's data."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model.eval()
    points: list[dict[str, Any]] = []
    total = len(settings.methods) * len(settings.ratios) + (baseline is None)
    with progress_bar("Token reduction sweep", total) as bar:
        if baseline is None:
            bar.describe("unpatched model")
            baseline = {"method": "none", "ratio": 0.0, **measure_point(model, task, settings, None)}
            bar.advance()
        for method in settings.methods:
            for ratio in settings.ratios:
                bar.describe(f"{method} at ratio {ratio:g}")
                with apply(model, method, ratio, layers=settings.layers, seed=settings.seed,
                           tokenizer=getattr(task, "tokenizer", None), **settings.options.get(method, {})) as patch:
                    point = {"method": method, "ratio": ratio, "patch": patch.describe(),
                             **measure_point(model, task, settings, patch)}
                _add_relative(point, baseline, task)
                points.append(point)
                if on_point is not None:
                    on_point(point)
                bar.advance()
    from prunekit.evaluate.report import environment

    return {"task": task.kind, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "protocol": task.describe(), "settings": settings.describe(), "environment": environment(),
            "baseline": baseline, "points": points}


def _add_relative(point: dict[str, Any], baseline: dict[str, Any], task: Task) -> None:
    # Paired timings carry their own speed-up; a ratio to the baseline measured earlier is the fallback.
    point["speedup"] = {size: speed.get("speedup", speed["items_per_second"] / baseline["throughput"][size]["items_per_second"])
                        for size, speed in point["throughput"].items() if size in baseline["throughput"]}
    point["flops_ratio"] = point["flops_per_item"] / baseline["flops_per_item"]
    point["quality_change"] = point["quality"][task.metric] - baseline["quality"][task.metric]


def quality_at_speedup(points: Sequence[dict[str, Any]], method: str, metric: str, speedup: float,
                       batch_size: str) -> float | None:
    """A method's quality at a given measured speed-up, linearly interpolated between its ratios
    (None if its measured speed-ups do not reach that far)."""
    curve = sorted((p["speedup"][batch_size], p["quality"][metric]) for p in points
                   if p["method"] == method and batch_size in p["speedup"])
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= speedup <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (speedup - x0) / (x1 - x0)
    return None


# ----- reports -----------------------------------------------------------------------------------
def sweep_table(result: dict[str, Any]) -> str:
    from prunekit.evaluate.report import markdown_table

    metric = result["metric"]
    sizes = list(result["baseline"]["throughput"])
    headers = ["method", "ratio", "layers", "tokens at the end", metric, f"Δ {metric}"]
    for size in sizes:
        headers += [f"items/s (batch {size})", f"speed-up (batch {size})"]
    headers += ["GFLOPs/item", "FLOPs ratio"]
    base = result["baseline"]
    rows = [["none", 0.0, "–", _tokens_in(result), base["quality"][metric], 0.0,
             *[value for size in sizes for value in (base["throughput"][size]["items_per_second"], 1.0)],
             base["flops_per_item"] / 1e9, 1.0]]
    for point in result["points"]:
        rows.append([point["method"], point["ratio"], ",".join(str(layer) for layer in point["patch"]["layers"]),
                     point["tokens"]["tokens_out"] if point["tokens"] else None, point["quality"][metric],
                     point["quality_change"],
                     *[value for size in sizes for value in (point["throughput"][size]["items_per_second"],
                                                              point["speedup"][size])],
                     point["flops_per_item"] / 1e9, point["flops_ratio"]])
    return markdown_table(headers, rows)


def _tokens_in(result: dict[str, Any]) -> float | None:
    for point in result["points"]:
        if point.get("tokens"):
            return point["tokens"]["tokens_in"]
    return None


def sweep_markdown(result: dict[str, Any], title: str) -> str:
    settings = result["settings"]
    env = result["environment"]
    lines = [f"# {title}", "", f"Task: {result['task']}; quality: {result['metric']} "
             f"({'higher' if result['higher_is_better'] else 'lower'} is better).", "",
             f"Protocol: {result['protocol']['text']}.", "",
             f"Timing: {settings['timing']}; batch sizes {settings['batch_sizes']}; torch {env['torch']}, "
             f"{env['threads']} threads, {env['processor']}.", "",
             "Ratio: the fraction of the reducible tokens (real, unprotected) each reducing layer removes; the "
             "layers column lists the blocks that reduce (after their attention, before their MLP).", "",
             sweep_table(result), ""]
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: str | Path, title: str, batch_size: str | None = None) -> None:
    from prunekit.evaluate.plots import plot_curves

    metric = result["metric"]
    size = batch_size or list(result["baseline"]["throughput"])[-1]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for point in result["points"]:
        xs, ys = curves.setdefault(point["method"], ([], []))
        xs.append(point["throughput"][size]["items_per_second"])
        ys.append(point["quality"][metric])
    base = result["baseline"]
    for method, (xs, ys) in curves.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        curves[method] = ([xs[i] for i in order], [ys[i] for i in order])
    curves["unpatched"] = ([base["throughput"][size]["items_per_second"]], [base["quality"][metric]])
    plot_curves(curves, path, xlabel=f"measured throughput, items/s (batch {size})", ylabel=metric, title=title,
                reference=(f"unpatched {metric}", base["quality"][metric]))

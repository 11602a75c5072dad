"""The pinned evaluation of kv-cache compression on a causal language model, all from offline data.

Three measurements at every (method, ratio), each against the full cache (the unpatched model):

- long-context perplexity: the first ``windows`` test-split wiki articles at least ``prompt + continuation``
  tokens long; the first ``prompt`` tokens are prefilled and compressed, the next ``continuation`` tokens are
  scored in one pass through the compressed cache; perplexity = exp(mean of the per-article mean losses).
- needle retrieval: a sentence "The secret number of the NAME vault is CODE." inserted at each depth (the
  fraction of the haystack before it) of a haystack cut from the next long test-split articles, a question
  after it, the greedy answer's first number compared with CODE (exact match). Question-aware: the question
  ends the compressed prompt; question-agnostic: only the haystack is compressed, the question follows it.
- cost: the cache's bytes after the prompt (what its tensors hold, padding included, and the bytes of the
  real entries), the peak resident memory of one scored article, the prefill's seconds and the greedy
  decoding's tokens per second, each timed in alternation with the full cache (``evaluate.measure``).
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from prunekit.core.text import tokenize, wiki_articles
from prunekit.errors import PrunekitError
from prunekit.kv.base import get_method
from prunekit.kv.patch import KVPatch, apply
from prunekit.kv.sparsity import held_bytes, sparse_bytes

NAMES = ("Lisbon", "Quito", "Tallinn", "Nairobi", "Osaka", "Bergen", "Cusco", "Dakar", "Hobart", "Tromsø")


@dataclass(frozen=True)
class KVProtocol:
    prompt_tokens: int = 2048
    continuation_tokens: int = 256
    windows: int = 4
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    question: str = "aware"  # or "agnostic"
    answer_tokens: int = 8
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    split: float = 0.8

    def describe(self) -> dict[str, Any]:
        info = asdict(self)
        info["perplexity"] = (f"first {self.windows} test-split wiki articles (last {1 - self.split:.0%} by article) "
                              f"of at least {self.prompt_tokens + self.continuation_tokens} tokens: prefix of "
                              f"{self.prompt_tokens} tokens compressed, the next {self.continuation_tokens} scored; "
                              "exp(mean of per-article mean losses)")
        info["needle"] = (f"'The secret number of the NAME vault is CODE.' (5-digit CODE, seed {self.seed}) at depths "
                          f"{list(self.depths)} of a haystack from the next long test-split articles, "
                          f"{self.prompt_tokens} tokens in all with the question; question-{self.question}; greedy "
                          f"answer of {self.answer_tokens} tokens, its first number must equal CODE")
        info["speed"] = (f"prefill seconds and greedy decoding of {self.decode_tokens} tokens after the first article's "
                         f"prefix, {self.repeats} pairs with the full cache in alternation after {self.warmup} "
                         "warm-up pairs; medians")
        return info


@dataclass
class Needle:
    prompt: torch.Tensor  # (1, tokens) haystack with the needle (and, question-aware, the question)
    question: torch.Tensor  # (1, tokens) fed after the compressed prompt when question-agnostic, else empty
    code: str
    depth: float


@dataclass
class KVData:
    articles: list[torch.Tensor]  # (1, prompt + continuation) each
    needles: list[Needle] = field(default_factory=list)


def long_articles(tokenizer, protocol: KVProtocol, length: int) -> list[torch.Tensor]:
    articles = wiki_articles()
    test = articles[int(len(articles) * protocol.split):]
    found = []
    for text in test:
        ids = tokenize(tokenizer, text)
        if ids.numel() >= length:
            found.append(ids[:length].view(1, -1))
    return found


def build_data(tokenizer, protocol: KVProtocol) -> KVData:
    """The articles and needle prompts of the protocol (the same for every method and ratio)."""
    if protocol.question not in ("aware", "agnostic"):
        raise PrunekitError(f"question must be 'aware' or 'agnostic', got {protocol.question!r}")
    length = protocol.prompt_tokens + protocol.continuation_tokens
    long = long_articles(tokenizer, protocol, length)
    if len(long) < protocol.windows + 1:
        raise PrunekitError(f"the wiki test split has {len(long)} articles of at least {length} tokens; the protocol "
                            f"needs {protocol.windows} for perplexity and one more for the needles: give fewer windows "
                            "or shorter prompts")
    data = KVData(articles=long[:protocol.windows])
    haystacks = long[protocol.windows:]
    rng = random.Random(protocol.seed)
    for index, depth in enumerate(protocol.depths):
        if not 0.0 <= depth <= 1.0:
            raise PrunekitError(f"needle depth {depth:g} is outside [0, 1]")
        name, code = NAMES[index % len(NAMES)], str(rng.randrange(10_000, 100_000))
        needle = tokenize(tokenizer, f" The secret number of the {name} vault is {code}. ").view(1, -1)
        question = tokenize(tokenizer, f"\nQuestion: what is the secret number of the {name} vault?\n"
                                       f"Answer: The secret number of the {name} vault is").view(1, -1)
        hay_tokens = protocol.prompt_tokens - needle.shape[1] - question.shape[1]
        if hay_tokens < 16:
            raise PrunekitError(f"a prompt of {protocol.prompt_tokens} tokens leaves no room for a haystack")
        hay = haystacks[index % len(haystacks)][:, :hay_tokens]
        cut = round(depth * hay_tokens)
        body = torch.cat([hay[:, :cut], needle, hay[:, cut:]], dim=1)
        if protocol.question == "aware":
            data.needles.append(Needle(torch.cat([body, question], dim=1), question[:, :0], code, depth))
        else:
            data.needles.append(Needle(body, question, code, depth))
    return data


def _prefill(model: nn.Module, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits


def _step(model: nn.Module, cache, ids: torch.Tensor, position: int, keep: int | None = None) -> torch.Tensor:
    positions = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
    return model(ids, cache=cache, position_ids=positions, logits_to_keep=keep or 0).logits


def greedy(model: nn.Module, cache, logits: torch.Tensor, position: int, steps: int) -> list[int]:
    """``steps`` greedy tokens after a prompt of ``position`` tokens whose last logits are ``logits``."""
    tokens = []
    for step in range(steps):
        token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
        if step + 1 < steps:
            logits = _step(model, cache, token, position + step, keep=1)[:, -1]
    return tokens


def article_loss(model: nn.Module, article: torch.Tensor, prompt: int) -> float:
    """Mean next-token loss of the continuation after the (possibly compressed) prefix."""
    prefix, continuation = article[:, :prompt], article[:, prompt:]
    cache, last = _prefill(model, prefix)
    logits = _step(model, cache, continuation[:, :-1], prompt)
    logits = torch.cat([last[:, None], logits], dim=1).float()
    return float(torch.nn.functional.cross_entropy(logits[0], continuation[0]))


def needle_answer(model: nn.Module, tokenizer, needle: Needle, protocol: KVProtocol) -> bool:
    cache, logits = _prefill(model, needle.prompt)
    position = needle.prompt.shape[1]
    if needle.question.shape[1]:
        logits = _step(model, cache, needle.question, position, keep=1)[:, -1]
        position += needle.question.shape[1]
    answer = tokenizer.decode(greedy(model, cache, logits, position, protocol.answer_tokens))
    found = re.match(r"\s*(\d+)", answer)
    return found is not None and found.group(1) == needle.code


def _truncate(cache, length: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def quality(model: nn.Module, tokenizer, data: KVData, protocol: KVProtocol) -> dict[str, Any]:
    import math

    from prunekit.evaluate.resources import Measured

    with torch.inference_mode():
        with Measured() as measured:
            losses = [article_loss(model, data.articles[0], protocol.prompt_tokens)]
        losses += [article_loss(model, article, protocol.prompt_tokens) for article in data.articles[1:]]
        hits = [needle_answer(model, tokenizer, needle, protocol) for needle in data.needles]
    return {"perplexity": math.exp(statistics.fmean(losses)), "losses": losses,
            "needle_exact_match": sum(hits) / len(hits) if hits else None,
            "needle_hits": {f"{needle.depth:g}": hit for needle, hit in zip(data.needles, hits)},
            "peak_rss_bytes": measured.peak_rss}


def timings(model: nn.Module, patch: KVPatch, data: KVData, protocol: KVProtocol) -> dict[str, Any]:
    """Prefill seconds and decoding tokens/s with the patch and with the full cache, timed in alternation."""
    from prunekit.evaluate.measure import time_alternating

    prefix = data.articles[0][:, :protocol.prompt_tokens]
    position = prefix.shape[1]
    prefill = time_alternating({"full": lambda: _prefill(model, prefix), "compressed": lambda: _prefill(model, prefix)},
                               protocol.repeats, protocol.warmup,
                               before={"full": patch.remove, "compressed": patch.install})
    with torch.inference_mode():
        patch.remove()
        full_cache, full_logits = _prefill(model, prefix)
        patch.install()
        small_cache, small_logits = _prefill(model, prefix)
    steps = protocol.decode_tokens
    prompt_bytes, prompt_sparse_bytes = held_bytes(small_cache), sparse_bytes(small_cache)
    budget = patch.decode
    if budget is not None:  # decoding changes the cache for good: time it on a fresh prefill each time
        def rewind_small() -> None:
            nonlocal small_cache, small_logits
            patch.install()
            small_cache, small_logits = _prefill(model, prefix)
    else:
        def rewind_small() -> None:
            patch.install()
            patch.rewind(small_cache)

    def rewind_full() -> None:
        patch.remove()
        _truncate(full_cache, position)

    decode = time_alternating({"full": lambda: greedy(model, full_cache, full_logits, position, steps),
                               "compressed": lambda: greedy(model, small_cache, small_logits, position, steps)},
                              protocol.repeats, protocol.warmup, before={"full": rewind_full, "compressed": rewind_small})
    patch.install()
    full_prefill, small_prefill = statistics.median(prefill["full"]), statistics.median(prefill["compressed"])
    full_decode, small_decode = statistics.median(decode["full"]), statistics.median(decode["compressed"])
    _truncate(full_cache, position)
    return {"prefill_seconds": small_prefill, "full_prefill_seconds": full_prefill,
            "prefill_time_ratio": small_prefill / full_prefill,
            "decode_tokens_per_second": (steps - 1) / small_decode,
            "full_decode_tokens_per_second": (steps - 1) / full_decode,
            "decode_speedup": full_decode / small_decode,
            "cache_bytes": prompt_bytes, "full_cache_bytes": held_bytes(full_cache),
            "sparse_format_bytes": prompt_sparse_bytes, "cache_bytes_after_decoding": held_bytes(small_cache),
            "cache_entry_bytes": patch.cache_entries() * 2 * full_cache.layers[0].keys.shape[-1]
            * full_cache.layers[0].keys.element_size()}


@dataclass
class SweepSettings:
    methods: list[dict[str, Any]]
    ratios: list[float]
    allocation: str = "uniform"
    decode_budget: int | None = None  # entries per key head kept while decoding (the needles' answers, the timing)
    decode_every: int = 16
    zero_ratio: float = 0.0
    protocol: KVProtocol = field(default_factory=KVProtocol)
    progress: Callable[[str], None] | None = None


def run_sweep(model: nn.Module, tokenizer, settings: SweepSettings) -> dict[str, Any]:
    protocol = settings.protocol
    data = build_data(tokenizer, protocol)
    say = settings.progress or (lambda message: None)
    say("full cache")
    baseline = quality(model, tokenizer, data, protocol)
    points = []
    for spec in settings.methods:
        for ratio in settings.ratios:
            method = get_method({**spec, "ratio": ratio})
            say(f"{method.name} at ratio {ratio:g}")
            patch = apply(model, method, allocation=settings.allocation, seed=protocol.seed,
                          decode_budget=settings.decode_budget, decode_every=settings.decode_every,
                          zero_ratio=settings.zero_ratio)
            try:
                measured = quality(model, tokenizer, data, protocol)
                measured.update(timings(model, patch, data, protocol))
            finally:
                patch.remove()
            measured["perplexity_change"] = measured["perplexity"] / baseline["perplexity"] - 1
            points.append({"method": method.name, "settings": method.settings(), "ratio": ratio, **measured})
    return {"protocol": protocol.describe(), "allocation": settings.allocation, "question": protocol.question,
            "decode_budget": settings.decode_budget, "decode_every": settings.decode_every,
            "zero_ratio": settings.zero_ratio, "baseline": baseline, "points": points}


def sweep_markdown(result: dict[str, Any], title: str) -> str:
    from prunekit.evaluate.report import human_bytes, markdown_table

    base = result["baseline"]
    rows = [["full cache", "0", f"{base['perplexity']:.3f}", "", f"{base['needle_exact_match']:.0%}", "", "", "", ""]]
    for point in result["points"]:
        rows.append([point["method"], f"{point['ratio']:g}", f"{point['perplexity']:.3f}",
                     f"{point['perplexity_change']:+.1%}", f"{point['needle_exact_match']:.0%}",
                     f"{human_bytes(point['cache_bytes'])} of {human_bytes(point['full_cache_bytes'])}",
                     f"{point['prefill_time_ratio']:.2f}×", f"{point['decode_tokens_per_second']:.1f} "
                     f"({point['decode_speedup']:.2f}×)", human_bytes(point["peak_rss_bytes"])])
    table = markdown_table(["method", "ratio", "perplexity", "change", "needle EM", "cache bytes",
                            "prefill time vs full", "decode tokens/s (vs full)", "peak RSS"], rows)
    protocol = "\n".join(f"- {key}: {value}" for key, value in result["protocol"].items())
    return (f"# {title}\n\nAllocation: {result['allocation']}; question-{result['question']}.\n\n{table}\n\n"
            f"{_extras(result)}Cache bytes: the key and value tensors the cache holds after the prompt (padding "
            f"slots of the adaptive allocation and zeroed entries included). Speeds are medians of pairs timed in alternation with the full cache; peak RSS is "
            f"the whole process's while the first article is scored.\n\n## Protocol\n{protocol}\n")


def _extras(result: dict[str, Any]) -> str:
    from prunekit.evaluate.report import human_bytes

    lines = []
    if result.get("decode_budget") is not None:
        ends = ", ".join(f"{p['method']}@{p['ratio']:g}: {human_bytes(p['cache_bytes_after_decoding'])}"
                         for p in result["points"])
        lines.append(f"Decoding budget: {result['decode_budget']} entries per key head, compressed every "
                     f"{result['decode_every']} tokens (the needles' answers and the timed decoding; a continuation "
                     f"scored in one pass is not compressed within it). Cache after the timed decoding: {ends}.")
    if result.get("zero_ratio"):
        sparse = ", ".join(f"{p['method']}@{p['ratio']:g}: {human_bytes(p['sparse_format_bytes'])}"
                           for p in result["points"])
        lines.append(f"Sparsity: {result['zero_ratio']:.0%} of every cached key and value vector zeroed (smallest "
                     f"magnitudes). The tensors stay dense, so the cache bytes above are what is really held; as a "
                     f"bitmap plus nonzero values the prompt's cache would take {sparse}.")
    return "".join(line + "\n\n" for line in lines)


def plot_sweep(result: dict[str, Any], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(point["method"] for point in result["points"]):
        points = [p for p in result["points"] if p["method"] == name]
        kept = [p["cache_bytes"] / p["full_cache_bytes"] for p in points]
        left.plot(kept, [p["perplexity"] for p in points], marker="o", label=name)
        right.plot(kept, [p["needle_exact_match"] for p in points], marker="o", label=name)
    left.axhline(result["baseline"]["perplexity"], color="grey", linestyle="--", label="full cache")
    right.axhline(result["baseline"]["needle_exact_match"], color="grey", linestyle="--", label="full cache")
    for axis, label in ((left, "long-context perplexity"), (right, "needle exact match")):
        axis.set_xlabel("cache bytes / full cache bytes")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

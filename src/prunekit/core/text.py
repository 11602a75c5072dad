"""Text for calibration and perplexity: the pinned ``wiki`` protocol and the user's own files.

The protocol (source, split, window length, window counts, seed) is a value object that every
report prints, so a perplexity figure can always be traced to exactly the text behind it.
"""

from __future__ import annotations

import bz2
import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

WIKI = "wiki"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 200


@dataclass(frozen=True)
class TextProtocol:
    """Which text calibrates and which text measures perplexity, cut into windows of ``seq_len`` tokens."""

    calibration: str = WIKI
    test: str = WIKI
    calibration_samples: int = 32
    test_windows: int = 40
    seq_len: int = 512
    seed: int = 0
    split: float = 0.8
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise PrunekitError(f"sequence length must be at least 2 tokens, got {self.seq_len}")
        if self.calibration_samples < 1:
            raise PrunekitError(f"calibration samples must be at least 1, got {self.calibration_samples}")
        if self.test_windows < 1:
            raise PrunekitError(f"test windows must be at least 1, got {self.test_windows}")
        if not 0.0 < self.split < 1.0:
            raise PrunekitError(f"the calibration/test split must be in (0, 1), got {self.split}")

    def describe(self) -> dict:
        info = asdict(self)
        info["calibration_split"] = (f"first {self.split:.0%} of wiki articles" if self.calibration == WIKI
                                     else f"file {self.calibration}")
        info["test_split"] = (f"last {1 - self.split:.0%} of wiki articles" if self.test == WIKI
                              else f"file {self.test}")
        info["calibration_windows"] = f"{self.calibration_samples} random windows of {self.seq_len} tokens (seed {self.seed})"
        info["test_protocol"] = (f"first {self.test_windows} non-overlapping windows of {self.seq_len} tokens; "
                                 "perplexity = exp(mean of per-window mean token losses)")
        return info

    def summary(self) -> str:
        return (f"calibration: {self.calibration} ({self.calibration_samples} × {self.seq_len} tokens, seed {self.seed}); "
                f"test: {self.test} (first {self.test_windows} × {self.seq_len}-token windows)"
                + (f"; wiki split {self.split:.0%}/{1 - self.split:.0%} by article" if WIKI in (self.calibration, self.test) else ""))


def _wiki_dump() -> Path:
    try:
        import gensim
    except ImportError:
        raise PrunekitError("the wiki protocol needs the gensim package: pip install gensim") from None
    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_FILE
    if not path.exists():
        raise PrunekitError(f"gensim's Wikipedia excerpt is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """Every non-redirect article of gensim's excerpt, in file order, as clean plain text."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_wiki_dump(), "rb") as dump:
        for _title, text, _pageid in extract_pages(dump):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text)
            clean = re.sub(r"'{2,}", "", clean)
            clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
            if len(clean) >= WIKI_MIN_CHARS:
                articles.append(clean)
    return tuple(articles)


def wiki_articles_of(part: str, split: float = 0.8) -> tuple[str, ...]:
    """The calibration (first ``split``) or test (the rest) articles of the wiki protocol."""
    articles = wiki_articles()
    cut = int(len(articles) * split)
    return articles[:cut] if part == "calibration" else articles[cut:]


def wiki_split(split: float = 0.8) -> tuple[str, str]:
    """(calibration text, test text): articles split by article, never by window."""
    return "\n\n".join(wiki_articles_of("calibration", split)), "\n\n".join(wiki_articles_of("test", split))


def read_text_file(path: str | Path, text_field: str = "text") -> str:
    """A .txt file whole, or the ``text_field`` of every line of a .jsonl file, joined by blank lines."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrunekitError(f"no such text file: {path}")
    if path.is_dir():
        raise PrunekitError(f"{path} is a directory; give a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrunekitError(f"{path} is not UTF-8 text") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise PrunekitError(f"{path}:{number} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise PrunekitError(f"{path}:{number} has no string field '{text_field}'")
            texts.append(record[text_field])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise PrunekitError(f"{path} contains no text")
    return raw


def source_text(source: str, part: str, protocol: TextProtocol) -> str:
    if source == WIKI:
        calibration, test = wiki_split(protocol.split)
        return calibration if part == "calibration" else test
    return read_text_file(source, protocol.text_field)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (long texts are fine: nothing is truncated)."""
    previous = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)  # silence the "longer than the model" warning; we window later
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if previous is not None:
            tokenizer.model_max_length = previous
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, count: int, length: int, seed: int, what: str = "calibration") -> torch.Tensor:
    if tokens.numel() < length:
        raise PrunekitError(f"{what} text has {tokens.numel()} tokens, shorter than one window of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (count,), generator=generator)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def consecutive_windows(tokens: torch.Tensor, count: int, length: int, what: str = "test") -> torch.Tensor:
    available = tokens.numel() // length
    if available == 0:
        raise PrunekitError(f"{what} text has {tokens.numel()} tokens, shorter than one window of {length}")
    if available < count:
        raise PrunekitError(f"{what} text holds only {available} windows of {length} tokens; ask for at most {available}")
    return tokens[: count * length].reshape(count, length)


def calibration_windows(tokenizer, protocol: TextProtocol) -> torch.Tensor:
    text = source_text(protocol.calibration, "calibration", protocol)
    return random_windows(tokenize(tokenizer, text), protocol.calibration_samples, protocol.seq_len, protocol.seed)


def test_windows(tokenizer, protocol: TextProtocol) -> torch.Tensor:
    text = source_text(protocol.test, "test", protocol)
    return consecutive_windows(tokenize(tokenizer, text), protocol.test_windows, protocol.seq_len)

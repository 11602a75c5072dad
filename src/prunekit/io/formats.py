"""Model formats on disk: each says whether a path is its own (``detect``), what it holds
(``identify``), and loads (``load``) and writes (``save``) it.

``prunekit.load`` (``prunekit.models.loading``) is the one way in: it resolves names and aliases,
asks these formats which one a path is, refuses a model of the wrong kind before loading it, and
adds the tokenizer. The formats live in ``io`` and import no pruning dimension: a structurally
shrunk directory is rebuilt from its shape spec here, without ``prunekit.structure``.

Every load refuses a checkpoint whose tensors do not match the model it describes (missing or
unexpected tensors, other shapes) in one line: transformers would otherwise fill the gaps with
random values behind a warning the CLI mutes. A head tied to the embeddings is not missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.core.cache import cache_dir
from prunekit.core.lowrank import CONFIG_KEY as LOWRANK_KEY
from prunekit.core.lowrank import restore_lowrank
from prunekit.core.progress import status
from prunekit.core.registry import Registry
from prunekit.core.shortcuts import restore_shortcuts
from prunekit.errors import PrunekitError
from prunekit.io.atomic import atomic_directory
from prunekit.io.checkpoint import (COMPRESSED_MARKER, is_compressed_dir, read_compressed_state, unique_state_dict,
                                    write_compressed, write_dense)

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
IMAGE_CLASSIFIER = "image-classifier"
MODULE = "module"  # a plain nn.Module rebuilt onto the skeleton its caller passed
KINDS = (CAUSAL_LM, ENCODER, IMAGE_CLASSIFIER, MODULE)

STRUCTURE_FILE = "prunekit_structure.json"
SPEC_WEIGHTS = "model.shrunk.safetensors"  # weights of directories only the shape spec describes
SHAPE_SPEC_FORMAT = "prunekit-structure"
SHAPE_SPEC_VERSION = 1
GGUF_MAGIC = b"GGUF"
GGUF_CACHE_MARKER = "prunekit-asset.json"  # written last: a cached dequantisation without it is unfinished
_SKIPPED_ATTRIBUTES = {"training", "_is_hf_initialized"}


@dataclass(frozen=True)
class Identity:
    """What a checkpoint holds, read without loading it: its kind and the class it was saved from."""

    kind: str | None
    architecture: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    kind: str | None = None  # the kind to build; None: the checkpoint's own
    dtype: torch.dtype | None = None  # None: float32 for Hugging Face and GGUF, the stored dtype for prunekit's formats
    trust_remote_code: bool = False
    skeleton: nn.Module | None = None  # the unpruned architecture, for models outside transformers
    attn_implementation: str | None = None


class ModelFormat:
    """One way a model is stored. ``priority`` orders detection: specific formats before the generic ones."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def identify(self, path: Path) -> Identity:
        return Identity(None)

    def prepare(self, path: Path) -> None:
        """One-time work before a load (with its own progress line, so it runs outside the loader's)."""

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, tokenizer=None, **settings: Any) -> None:
        raise PrunekitError(f"prunekit reads the {self.name} format but does not write it")

    def tokenizer_dir(self, path: Path) -> Path | None:
        """Where this checkpoint's tokenizer files are, if it can have any."""
        return path if path.is_dir() else None


FORMATS: Registry[type[ModelFormat]] = Registry("model format")


def detect_format(path: Path) -> ModelFormat:
    """The format of a local path, or a one-line reason why it is no model prunekit reads."""
    for name in sorted(FORMATS.names(), key=lambda n: (FORMATS.get(n).priority, n)):
        model_format = FORMATS.get(name)()
        if model_format.detect(path):
            return model_format
    if path.is_file():
        raise PrunekitError(f"model {path} is a file; give the model's directory (or a .gguf file)")
    if not (path / "config.json").exists():
        raise PrunekitError(f"{path} is not a model directory: it has no config.json")
    raise PrunekitError(f"{path} is in no format prunekit reads")


def load_path(path: str | os.PathLike, options: LoadOptions | None = None) -> nn.Module:
    """The model stored at a local path, in whatever format it is (no aliases, hub ids or tokenizer:
    ``prunekit.load`` adds those)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrunekitError(f"no such model directory: {path}")
    return detect_format(path).load(path, options or LoadOptions())


def save_model(model: nn.Module, out_dir: str | os.PathLike, format: str = "huggingface", tokenizer=None,
               overwrite: bool = False, **settings: Any) -> Path:
    """Write ``model`` (and ``tokenizer``) into a new directory in a registered format, atomically."""
    model_format = FORMATS.get(format)()
    with atomic_directory(out_dir, overwrite) as tmp:
        model_format.save(model, tmp, tokenizer, **settings)
    return Path(out_dir)


# ------------------------------------------------------------------------------ kinds of models

def causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def kind_of_architecture(architecture: str | None) -> str | None:
    """The kind a saved class name says (None when it says nothing)."""
    if not architecture:
        return None
    if architecture in causal_lm_classes() or architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if architecture.endswith("ForImageClassification"):
        return IMAGE_CLASSIFIER
    return ENCODER


def identify_config(config: dict) -> Identity:
    """A Hugging Face config's kind: the first of its ``architectures`` with a head, else what its model type is."""
    architectures = config.get("architectures") or []
    for architecture in architectures:
        kind = kind_of_architecture(architecture)
        if kind != ENCODER:
            return Identity(kind, architecture)
    if architectures:
        return Identity(ENCODER, architectures[0])
    return Identity(_kind_of_model_type(config.get("model_type")))


def _kind_of_model_type(model_type: str | None) -> str | None:
    """A config that names no class (written by hand): decoders have a causal-LM class and no masked-LM one."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES)

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CAUSAL_LM
    return ENCODER if model_type in MODEL_MAPPING_NAMES else None


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunekitError(f"{config_file} is corrupt: {exc}") from None
    if not isinstance(config, dict):
        raise PrunekitError(f"{config_file} is corrupt: it holds a JSON {type(config).__name__}, not an object")
    return config


def _first(names, count: int = 3) -> str:
    names = sorted(str(name) for name in names)
    more = f", ... ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def refuse_mismatch(source: object, missing=(), unexpected=(), mismatched=()) -> None:
    """One line naming what does not fit, so no tensor is silently left random or dropped."""
    problems = []
    if missing:
        problems.append(f"lacks tensors the model needs ({_first(missing)})")
    if unexpected:
        problems.append(f"holds tensors the model does not have ({_first(unexpected)})")
    if mismatched:
        problems.append(f"holds tensors of other shapes than its config says ({_first(mismatched)})")
    if problems:
        raise PrunekitError(f"{source} does not match its config: it " + " and ".join(problems)
                            + "; refusing to fill the gaps with random weights")


def build_skeleton(directory: Path, architecture: str | None) -> nn.Module:
    """An empty (meta-device) transformers model of ``architecture`` built from the directory's config."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_cls = getattr(transformers, architecture, None) if architecture else None
    if model_cls is None:
        raise PrunekitError(f"{directory}: unknown architecture {architecture!r}; pass the model skeleton to "
                            "prunekit.load(path, model=...)")
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        return model_cls._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)


def read_safetensors_dir(path: Path, files: list[Path] | None = None) -> dict[str, torch.Tensor]:
    files = files if files is not None else sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunekitError(f"{path} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise PrunekitError(f"corrupt weights file {file}: {exc}") from None
    return state


def load_into_skeleton(source: object, skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a state dict into the caller's skeleton; a tensor the skeleton shares with a stored one is not missing."""
    expected = skeleton.state_dict(keep_vars=True)
    mismatched = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    refuse_mismatch(source, mismatched=mismatched)
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    stored = [expected[k] for k in state if k in expected]
    missing = [k for k in missing if not any(expected[k] is tensor for tensor in stored)]
    refuse_mismatch(source, missing, unexpected)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton


def _to_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------ the formats

@FORMATS.register("compressed")
class CompressedFormat(ModelFormat):
    summary = "prunekit's compressed directory (bitmask + packed values), restored bit for bit"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and is_compressed_dir(path)

    def _marker(self, path: Path) -> dict:
        try:
            marker = json.loads((path / COMPRESSED_MARKER).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunekitError(f"corrupt compressed checkpoint marker in {path}: {exc}") from None
        if not isinstance(marker, dict):
            raise PrunekitError(f"corrupt compressed checkpoint marker in {path}: not a JSON object")
        return marker

    def identify(self, path: Path) -> Identity:
        architecture = self._marker(path).get("architecture")
        return Identity(kind_of_architecture(architecture), architecture)

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        marker = self._marker(path)
        state, aliases = read_compressed_state(path)
        model = (options.skeleton if options.skeleton is not None
                 else restore_shortcuts(restore_lowrank(build_skeleton(path, marker.get("architecture")))))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        refuse_mismatch(path, unexpected=unexpected)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        for alias, owner in aliases.items():
            if alias in missing:
                module_name, _, attr = alias.rpartition(".")
                owner_module, _, owner_attr = owner.rpartition(".")
                setattr(model.get_submodule(module_name), attr, getattr(model.get_submodule(owner_module), owner_attr))
        # A key left out because it is tied to another (HF's tie_weights restored it) is not missing.
        current = model.state_dict()
        refuse_mismatch(path, missing=[k for k in missing
                                       if k not in aliases and (k not in current or current[k].is_meta)])
        return _to_dtype(model, options.dtype)

    def save(self, model: nn.Module, directory: Path, tokenizer=None, codec: str = "zstd", **settings: Any) -> None:
        write_compressed(model, directory, tokenizer, codec)


def needs_shape_spec(path: Path) -> bool:
    """A structurally pruned directory whose widths its config cannot describe."""
    spec = path / STRUCTURE_FILE
    if not spec.exists():
        return False
    try:
        return not json.loads(spec.read_text()).get("from_pretrained", False)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # the shape-spec format reports the corrupt file in its own words


def _simple(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)


def shape_spec(model: nn.Module, blocks: dict[str, list[int]] | None = None) -> dict:
    """Every module's tensor shapes and plain attributes (sizes, head counts), enough to rebuild it."""
    modules = {}
    for name, module in model.named_modules():
        attributes = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(module).items()
                      if not k.startswith("_") and k not in _SKIPPED_ATTRIBUTES and _simple(v)}
        tensors = {k: (list(v.shape) if v is not None else None)
                   for k, v in list(module._parameters.items()) + list(module._buffers.items())}
        tuples = [k for k, v in vars(module).items() if isinstance(v, tuple) and _simple(v)]
        modules[name] = {"type": type(module).__name__, "attributes": attributes, "tuples": tuples, "tensors": tensors}
    config = getattr(model, "config", None)
    return {"format": SHAPE_SPEC_FORMAT, "version": SHAPE_SPEC_VERSION, "architecture": type(model).__name__,
            "huggingface": config is not None and hasattr(model, "save_pretrained"),
            "blocks": blocks or {}, "modules": modules}


def write_shape_spec(model: nn.Module, directory: Path, blocks: dict[str, list[int]] | None, from_pretrained: bool,
                     reasons: list[str], aliases: dict[str, str]) -> None:
    spec = shape_spec(model, blocks)
    spec.update({"from_pretrained": from_pretrained, "reasons": reasons, "aliases": aliases})
    (directory / STRUCTURE_FILE).write_text(json.dumps(spec, indent=1))


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Reshape a skeleton (same architecture, original sizes) to the spec, with empty tensors."""
    for path, kept in spec.get("blocks", {}).items():
        blocks = model.get_submodule(path)
        if len(blocks) != len(kept) and isinstance(blocks, nn.ModuleList):
            parent_name, _, attribute = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attribute, nn.ModuleList([blocks[i] for i in kept]))
    modules = dict(model.named_modules())
    for name, entry in spec["modules"].items():
        module = modules.get(name)
        if module is None:
            raise PrunekitError(f"the skeleton has no module '{name}'; it is not the architecture that was saved")
        if type(module).__name__ != entry["type"]:
            raise PrunekitError(f"module '{name or '<root>'}' is a {type(module).__name__} in the skeleton but was a "
                                f"{entry['type']}: pass the architecture that was saved")
        for key, value in entry["attributes"].items():
            setattr(module, key, tuple(value) if key in entry.get("tuples", ()) else value)
        for key, shape in entry["tensors"].items():
            current = module._parameters.get(key, module._buffers.get(key))
            if shape is None:
                if key in module._parameters:
                    module._parameters[key] = None
                continue
            if current is not None and list(current.shape) == shape:
                continue
            dtype = current.dtype if current is not None else torch.float32
            empty = torch.empty(shape, dtype=dtype, device="meta")
            if key in module._buffers and current is not None:
                module._buffers[key] = empty
            else:
                module._parameters[key] = nn.Parameter(empty, requires_grad=dtype.is_floating_point)
    return model


@FORMATS.register("shape-spec")
class ShapeSpecFormat(ModelFormat):
    summary = ("a structurally shrunk directory whose widths its config cannot describe, rebuilt from its shape "
               f"spec ({STRUCTURE_FILE})")

    def detect(self, path: Path) -> bool:
        return path.is_dir() and needs_shape_spec(path)

    def _spec(self, path: Path) -> dict:
        try:
            spec = json.loads((path / STRUCTURE_FILE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunekitError(f"corrupt shape spec {path / STRUCTURE_FILE}: {exc}") from None
        if not isinstance(spec, dict) or spec.get("format") != SHAPE_SPEC_FORMAT \
                or spec.get("version") != SHAPE_SPEC_VERSION:
            raise PrunekitError(f"{path / STRUCTURE_FILE} is not a prunekit shape spec of version {SHAPE_SPEC_VERSION}")
        return spec

    def identify(self, path: Path) -> Identity:
        spec = self._spec(path)
        if not spec.get("huggingface"):
            return Identity(MODULE, spec.get("architecture"))
        return Identity(kind_of_architecture(spec.get("architecture")), spec.get("architecture"))

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        spec = self._spec(path)
        model = options.skeleton
        if model is None:
            if not spec.get("huggingface"):
                raise PrunekitError(f"{path} holds a {spec.get('architecture')} that is not a Hugging Face model; "
                                    "pass its unpruned skeleton: prunekit.load(path, model=...)")
            model = restore_shortcuts(restore_lowrank(build_skeleton(path, spec["architecture"])))
        apply_spec(model, spec)
        missing, unexpected = model.load_state_dict(read_safetensors_dir(path), strict=False, assign=True)
        refuse_mismatch(path, unexpected=unexpected)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        for alias, owner in spec.get("aliases", {}).items():
            alias_module, _, alias_attribute = alias.rpartition(".")
            owner_module, _, owner_attribute = owner.rpartition(".")
            target = model.get_submodule(alias_module) if alias_module else model
            source = model.get_submodule(owner_module) if owner_module else model
            if alias_attribute in target._parameters:
                target._parameters[alias_attribute] = getattr(source, owner_attribute)
            else:
                target._buffers[alias_attribute] = getattr(source, owner_attribute)
        refuse_mismatch(path, missing=[n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                                       if p.is_meta])
        return _to_dtype(model, options.dtype)

    def save(self, model: nn.Module, directory: Path, tokenizer=None, blocks: dict[str, list[int]] | None = None,
             reasons: list[str] | None = None, **settings: Any) -> None:
        """The weights under a name ``from_pretrained`` does not look for (it would re-initialise every tensor
        its config gets wrong, with only a warning), the config, and the shape spec."""
        if hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None:
            model.config.save_pretrained(directory)
            generation = getattr(model, "generation_config", None)
            if generation is not None and getattr(model, "can_generate", lambda: False)():
                generation.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        state, aliases = unique_state_dict(model)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / SPEC_WEIGHTS))
        write_shape_spec(model, directory, blocks, False, list(reasons or []), aliases)


@FORMATS.register("gguf")
class GgufFormat(ModelFormat):
    summary = "a GGUF file (llama.cpp), dequantised once to float32 and cached"

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix.lower() == ".gguf":
            return True
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC

    def identify(self, path: Path) -> Identity:
        return Identity(CAUSAL_LM)  # transformers reads GGUF for decoders only

    def prepare(self, path: Path) -> None:
        dequantized_gguf_dir(path)

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        return HuggingFaceFormat().load(dequantized_gguf_dir(path), options)

    def tokenizer_dir(self, path: Path) -> Path | None:
        return dequantized_gguf_dir(path)


def _gguf_cache_name(gguf: Path) -> str:
    """Changes with the file: its resolved path, size and modification time (hashing gigabytes on every load
    would cost more than the load)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{gguf.stem.lower()}-{key}"


def dequantized_gguf_dir(gguf: str | os.PathLike, cache_name: str | None = None,
                         display_name: str | None = None) -> Path:
    """A GGUF file as a float32 safetensors directory with its tokenizer, dequantised on first use and cached."""
    gguf = Path(gguf)
    target = cache_dir("models") / (cache_name or _gguf_cache_name(gguf))
    if (target / GGUF_CACHE_MARKER).exists():
        return target
    if not gguf.is_file():
        raise PrunekitError(f"no such GGUF file: {gguf}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = display_name or gguf.stem
    with status(f"Dequantizing {name} once into {target}"):
        try:
            model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                               output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except PrunekitError:
            raise
        except Exception as exc:  # the GGUF reader raises many types for files it cannot read
            text = str(exc).strip().splitlines()
            raise PrunekitError(f"could not read the GGUF file {gguf}: {type(exc).__name__}: "
                                f"{text[0] if text else ''}") from None
        refuse_mismatch(gguf, info["missing_keys"], info["unexpected_keys"], _mismatched(info))
        # save_pretrained refuses models that still carry their GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / GGUF_CACHE_MARKER).write_text(json.dumps({"source": str(gguf), "name": name}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _mismatched(info: dict) -> list[str]:
    return [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys") or ()]


_AUTO_CLASSES = {CAUSAL_LM: "AutoModelForCausalLM", IMAGE_CLASSIFIER: "AutoModelForImageClassification",
                 ENCODER: "AutoModel"}


@FORMATS.register("lowrank")
class LowRankFormat(ModelFormat):
    summary = (f"a Hugging Face directory whose config lists low-rank layers ({LOWRANK_KEY}: a pruned linear plus "
               "its correction, or a linear factored in two), rebuilt before its tensors load")
    priority = 5  # a config.json like any Hugging Face directory: before the generic format

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").exists()):
            return False
        try:
            return LOWRANK_KEY in read_config(path)
        except PrunekitError:
            return False  # a corrupt config: the Hugging Face format says so in its own words

    def identify(self, path: Path) -> Identity:
        return identify_config(read_config(path))

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        architectures = read_config(path).get("architectures") or [None]
        model = options.skeleton if options.skeleton is not None else build_skeleton(path, architectures[0])
        restore_shortcuts(restore_lowrank(model))
        state = read_safetensors_dir(path)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        refuse_mismatch(path, unexpected=unexpected)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        refuse_mismatch(path, missing=[n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                                       if p.is_meta])
        return _to_dtype(model, options.dtype)

    def save(self, model: nn.Module, directory: Path, tokenizer=None, **settings: Any) -> None:
        write_dense(model, directory, tokenizer)


@FORMATS.register("huggingface")
class HuggingFaceFormat(ModelFormat):
    summary = "a Hugging Face directory (config.json + safetensors or .bin) or a hub id"
    priority = 10  # any directory with a config.json: after the formats that mark their own

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").exists()

    def identify(self, path: Path) -> Identity:
        return identify_config(read_config(path))

    def load(self, path: Path | str, options: LoadOptions) -> nn.Module:
        """``path`` is a local directory, or a hub id as a string."""
        import transformers

        if options.skeleton is not None:
            return _to_dtype(load_into_skeleton(path, options.skeleton, read_safetensors_dir(Path(path))),
                             options.dtype)
        kind = options.kind or ENCODER
        if kind not in _AUTO_CLASSES:
            raise PrunekitError(f"{path} cannot be loaded as a {kind}")
        extra = {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}
        auto_class = getattr(transformers, _AUTO_CLASSES[kind])

        def from_pretrained(**settings):
            # Mismatched shapes are collected and refused below, naming the tensors, instead of transformers'
            # error that points at a report the CLI mutes.
            return auto_class.from_pretrained(path, dtype=options.dtype or torch.float32,
                                              trust_remote_code=options.trust_remote_code, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **extra, **settings)

        model, info = from_pretrained()
        if kind == ENCODER and _lacks_only_its_pooler(model, info["missing_keys"]):
            # A masked-LM checkpoint has no pooler: the body is built without one rather than with a random one.
            model, info = from_pretrained(add_pooling_layer=False)
        unexpected = info["unexpected_keys"]
        if kind == ENCODER and type(model).__name__ not in (getattr(model.config, "architectures", None) or ()):
            unexpected = _outside_base_model(model, unexpected)
        refuse_mismatch(path, info["missing_keys"], unexpected, _mismatched(info))
        if info.get("error_msgs"):
            raise PrunekitError(f"could not load model from {path}: {_first(info['error_msgs'], 1)}")
        return model.eval()

    def save(self, model: nn.Module, directory: Path, tokenizer=None, **settings: Any) -> None:
        write_dense(model, directory, tokenizer)


def _lacks_only_its_pooler(model: nn.Module, missing) -> bool:
    import inspect

    return bool(missing) and all(key.split(".")[0] == "pooler" for key in missing) \
        and "add_pooling_layer" in inspect.signature(type(model).__init__).parameters


def _outside_base_model(model: nn.Module, unexpected) -> list[str]:
    """Of the tensors a base model (an encoder's body) did not take, those inside it.

    A checkpoint of a task model (``BertForMaskedLM``) loaded as its body leaves out the task's head
    (``cls.*``): that head is not what the encoder commands measure. A tensor under one of the body's own
    modules is another matter: it means the checkpoint and the config disagree.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    children = {name for name, _ in model.named_children()}
    inside = []
    for key in unexpected:
        key = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
        if key.split(".")[0] in children:
            inside.append(key)
    return inside


@FORMATS.register("safetensors")
class StateDictFormat(ModelFormat):
    summary = "safetensors without a config (a plain nn.Module saved by prunekit): needs its skeleton"
    priority = 20

    def detect(self, path: Path) -> bool:
        return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.safetensors"))

    def identify(self, path: Path) -> Identity:
        return Identity(MODULE)

    def load(self, path: Path, options: LoadOptions) -> nn.Module:
        if options.skeleton is None:
            raise PrunekitError(f"{path} holds weights without a config; pass the model's skeleton: "
                                "prunekit.load(path, model=...)")
        return _to_dtype(load_into_skeleton(path, options.skeleton, read_safetensors_dir(path)), options.dtype)

    def save(self, model: nn.Module, directory: Path, tokenizer=None, **settings: Any) -> None:
        write_dense(model, directory, tokenizer)


__all__ = ["CAUSAL_LM", "ENCODER", "FORMATS", "IMAGE_CLASSIFIER", "KINDS", "MODULE", "SPEC_WEIGHTS", "STRUCTURE_FILE",
           "Identity", "LoadOptions", "ModelFormat", "apply_spec", "build_skeleton", "detect_format",
           "dequantized_gguf_dir", "identify_config", "kind_of_architecture", "load_path", "needs_shape_spec",
           "refuse_mismatch", "save_model", "shape_spec", "write_shape_spec"]

from prunekit.io import compressed_tensors_format  # noqa: E402,F401 - registers the compressed-tensors format

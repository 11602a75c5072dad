"""Saving shrunk models so they load back, and exporting them to ONNX.

A Hugging Face model is written with ``save_pretrained`` after its config is updated to the new
widths (``ModelAdapter.structure_config``). The config is then checked the only honest way: a
skeleton is built from it and every tensor shape compared with the shrunk model. Where they all
match, plain ``from_pretrained`` loads the directory. Where they do not (widths that differ by
layer, BERT heads) the directory still holds the weights and config, plus a *shape spec*
(``prunekit_structure.json``: every module's tensor shapes and size attributes) from which
``prunekit.load`` rebuilds the model. Models outside transformers are saved the same way and
rebuilt onto a skeleton the caller passes (the unpruned architecture).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import unique_state_dict
from prunekit.models.base import ModelAdapter

STRUCTURE_FILE = "prunekit_structure.json"
SPEC_WEIGHTS = "model.shrunk.safetensors"  # weights of directories only the shape spec describes
FORMAT = "prunekit-structure"
VERSION = 1
_SKIPPED_ATTRIBUTES = {"training", "_is_hf_initialized"}


@dataclass
class SaveReport:
    from_pretrained: bool
    reasons: list[str] = field(default_factory=list)
    weights_bytes: int = 0

    def to_dict(self) -> dict:
        return {"from_pretrained": self.from_pretrained, "reasons": self.reasons, "weights_bytes": self.weights_bytes}


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
    return {"format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
            "huggingface": config is not None and hasattr(model, "save_pretrained"),
            "blocks": blocks or {}, "modules": modules}


def _skeleton(directory: Path, architecture: str) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_cls = getattr(transformers, architecture, None)
    if model_cls is None:
        raise PrunekitError(f"{directory}: unknown architecture {architecture!r}; pass the model skeleton to prunekit.load")
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        return model_cls._from_config(config, dtype=torch.float32)


def _state_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config_mismatches(model: nn.Module) -> list[str]:
    """Tensors whose shape a skeleton built from the model's own config would get wrong."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        skeleton = _skeleton(Path(tmp), type(model).__name__)
    expected, actual = _state_shapes(skeleton), _state_shapes(model)
    wrong = [k for k in actual if expected.get(k) != actual[k]]
    wrong += [k for k in expected if k not in actual]
    return wrong


def save_structured(model: nn.Module, directory: str | os.PathLike, tokenizer=None, adapter: ModelAdapter | None = None,
                    blocks: dict[str, list[int]] | None = None) -> SaveReport:
    """Write the shrunk model into an existing (temporary) directory; see the module docstring."""
    directory = Path(directory)
    reasons: list[str] = []
    huggingface = hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None
    loadable = False
    if huggingface:
        if adapter is not None:
            updates, blockers = adapter.structure_config()
            for key, value in updates.items():
                setattr(model.config, key, value)
            reasons += blockers
        wrong = _config_mismatches(model)
        if wrong and not reasons:
            reasons.append(f"the config cannot describe {len(wrong)} tensor shapes (first: {wrong[0]})")
        loadable = not wrong
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    if loadable:
        model.save_pretrained(directory)
    else:
        # A weights file from_pretrained does not look for: transformers would otherwise re-initialise
        # every mismatched tensor with only a warning, and hand back a broken model.
        if huggingface:
            model.config.save_pretrained(directory)
            generation = getattr(model, "generation_config", None)
            if generation is not None and getattr(model, "can_generate", lambda: False)():
                generation.save_pretrained(directory)
        else:
            reasons.append("not a Hugging Face model: rebuild it with prunekit.load(path, model=<unpruned skeleton>)")
        state, aliases = unique_state_dict(model)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / SPEC_WEIGHTS))
    spec = shape_spec(model, blocks)
    spec["from_pretrained"] = loadable
    spec["reasons"] = reasons
    spec["aliases"] = {} if loadable else aliases
    (directory / STRUCTURE_FILE).write_text(json.dumps(spec, indent=1))
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return SaveReport(loadable, reasons if not loadable else [], weights)


def is_structured_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / STRUCTURE_FILE).exists()


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads((path / STRUCTURE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"corrupt shape spec {path / STRUCTURE_FILE}: {exc}") from None
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise PrunekitError(f"{path / STRUCTURE_FILE} is not a prunekit shape spec of version {VERSION}")
    return spec


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


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunekitError(f"{path} holds no .safetensors weights")
    state = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise PrunekitError(f"corrupt weights file {file}: {exc}") from None
    return state


def load_structured(path: str | os.PathLike, model: nn.Module | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a shrunk model from its directory (``model``: the unpruned skeleton for non-HF models)."""
    path = Path(path).expanduser()
    spec = _read_spec(path)
    if model is None:
        if not spec.get("huggingface"):
            raise PrunekitError(f"{path} holds a {spec.get('architecture')} that is not a Hugging Face model; "
                                "pass its unpruned skeleton: prunekit.load(path, model=...)")
        model = _skeleton(path, spec["architecture"])
    apply_spec(model, spec)
    state = _read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise PrunekitError(f"{path} holds tensors the model does not have: {', '.join(unexpected[:3])}")
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
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise PrunekitError(f"{path} lacks tensors the model needs: {', '.join(still_meta[:3])}")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def export_onnx(model: nn.Module, example_inputs: tuple, path: str | os.PathLike,
                input_names: list[str] | None = None, output_fn=None) -> Path:
    """Export with torch.onnx (the dynamo exporter); ``output_fn`` picks the tensor to export from
    structured outputs (for example the logits of a language model)."""
    import warnings

    class _Wrapped(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            output = self.inner(*args)
            return output_fn(output) if output_fn is not None else output

    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise PrunekitError(f"ONNX export needs {package}: pip install 'prunekit[onnx]'")
    path = Path(path)
    module = _Wrapped(model) if output_fn is not None else model
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # the exporter warns about optional torchvision ops on every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example_inputs, str(path), dynamo=True, input_names=input_names,
                              verbose=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        text = str(exc).strip().splitlines()
        raise PrunekitError(f"ONNX export failed: {type(exc).__name__}: {text[0] if text else ''}") from None
    finally:
        onnx_logger.setLevel(level)
    return path


def check_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: tuple, output_fn=None) -> float:
    """Run the ONNX file with onnxruntime and return the largest absolute difference to PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        raise PrunekitError("checking ONNX needs onnxruntime: pip install 'prunekit[onnx]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), example_inputs)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        output = model(*example_inputs)
    expected = output_fn(output) if output_fn is not None else output
    return float((got - expected.float()).abs().max())

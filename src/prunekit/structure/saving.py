"""Saving shrunk models so they load back, and exporting them to ONNX.

A Hugging Face model is written with ``save_pretrained`` after its config is updated to the new
widths (``ModelAdapter.structure_config``). The config is then checked the only honest way: a
skeleton is built from it and every tensor shape compared with the shrunk model. Where they all
match, plain ``from_pretrained`` loads the directory. Where they do not (widths that differ by
layer, BERT heads) the directory still holds the weights and config, plus a *shape spec*
(``prunekit_structure.json``: every module's tensor shapes and size attributes) from which
``prunekit.load`` rebuilds the model (the shape-spec format lives in ``prunekit.io.formats``, so
loading needs nothing of this package), and model code that lets plain transformers rebuild it
without prunekit: ``from_pretrained(DIR, trust_remote_code=True)`` (``prunekit.io.remote_code``).
Models outside transformers are saved the same way and rebuilt onto a skeleton the caller passes
(the unpruned architecture).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.formats import FORMATS, SPEC_WEIGHTS, STRUCTURE_FILE, build_skeleton, shape_spec, write_shape_spec
from prunekit.io.remote_code import forget_remote_code, shape_changes, write_remote_code
from prunekit.models.base import ModelAdapter

__all__ = ["SPEC_WEIGHTS", "STRUCTURE_FILE", "SaveReport", "check_onnx", "export_onnx", "save_structured"]


@dataclass
class SaveReport:
    from_pretrained: bool
    reasons: list[str] = field(default_factory=list)
    weights_bytes: int = 0
    remote_code: bool = False  # from_pretrained(DIR, trust_remote_code=True) loads it with the code saved beside it

    def to_dict(self) -> dict:
        return {"from_pretrained": self.from_pretrained, "reasons": self.reasons, "weights_bytes": self.weights_bytes,
                "remote_code": self.remote_code}


def _state_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config_mismatches(model: nn.Module) -> list[str]:
    """Tensors whose shape a skeleton built from the model's own config would get wrong."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        skeleton = build_skeleton(Path(tmp), type(model).__name__)
    expected, actual = _state_shapes(skeleton), _state_shapes(model)
    wrong = [k for k in actual if expected.get(k) != actual[k]]
    wrong += [k for k in expected if k not in actual]
    return wrong


def _config_refusal(config) -> str | None:
    """Why the config refuses its own values (transformers validates a config when it is saved), or None."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # noqa: BLE001 - strict dataclasses raise their own error types
        cause = exc.__cause__ or exc
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return None


def _keep_valid_config(config, updates: dict, previous: dict) -> list[str]:
    """Undo, last first, the width updates a config refuses (a SliceGPT hidden width that is no multiple of the
    heads, say): the shape spec then describes those widths, and the reasons say why."""
    first = refusal = _config_refusal(config)
    undone: list[str] = []
    for key in reversed(list(updates)):
        if refusal is None:
            break
        if key in previous:
            setattr(config, key, previous[key])
        else:  # the config had no such key before: leave it without one
            delattr(config, key)
        undone.append(key)
        refusal = _config_refusal(config)
    return [f"the config refuses the new {', '.join(undone)} ({first})"] if undone else []


def save_structured(model: nn.Module, directory: str | os.PathLike, tokenizer=None, adapter: ModelAdapter | None = None,
                    blocks: dict[str, list[int]] | None = None) -> SaveReport:
    """Write the shrunk model into an existing (temporary) directory; see the module docstring."""
    directory = Path(directory)
    reasons: list[str] = []
    huggingface = hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None
    if huggingface:
        forget_remote_code(model.config)  # a model read back and shrunk again: those shapes no longer hold
    loadable = False
    if huggingface:
        if adapter is not None:
            updates, blockers = adapter.structure_config()
            previous = {key: getattr(model.config, key) for key in updates if hasattr(model.config, key)}
            for key, value in updates.items():
                setattr(model.config, key, value)
            reasons += blockers + _keep_valid_config(model.config, updates, previous)
        wrong = _config_mismatches(model)
        if wrong and not reasons:
            reasons.append(f"the config cannot describe {len(wrong)} tensor shapes (first: {wrong[0]})")
        loadable = not wrong
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    remote = False
    if loadable:
        model.save_pretrained(directory)
        write_shape_spec(model, directory, blocks, True, reasons, {})
    else:
        if not huggingface:
            reasons.append("not a Hugging Face model: rebuild it with prunekit.load(path, model=<unpruned skeleton>)")
        FORMATS.get("shape-spec")().save(model, directory, blocks=blocks, reasons=reasons)
        remote = huggingface and _add_remote_code(model, directory, reasons)
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return SaveReport(loadable, reasons if not loadable else [], weights, remote)


def _add_remote_code(model: nn.Module, directory: Path, reasons: list[str]) -> bool:
    """Make a directory the shape spec describes loadable by plain transformers (``prunekit.io.remote_code``):
    the model code, the shapes it applies, and the weights under the name ``from_pretrained`` reads (the shape
    spec's own name keeps them from a ``from_pretrained`` that would re-initialise them quietly; with the code,
    the family's class refuses them loudly instead). False, and a reason, where the code cannot describe it."""
    architecture = type(model).__name__
    try:
        skeleton = build_skeleton(directory, architecture)
        changes, why = shape_changes(shape_spec(model), skeleton, shape_spec(skeleton))
    except Exception as exc:  # noqa: BLE001 - the code is an extra: the shape spec has saved the model already
        changes, why = None, f"its config does not build ({type(exc).__name__}: {str(exc).strip()[:120]})"
    if changes is None or not write_remote_code(directory, architecture, changes):
        reasons.append(f"plain transformers cannot rebuild it: {why or f'{architecture} is in no Auto class'}")
        return False
    os.replace(directory / SPEC_WEIGHTS, directory / "model.safetensors")
    return True


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

"""Model code for a structurally shrunk transformers model whose widths differ by layer.

prunekit copies this file next to the weights of such a model (as ``modeling_shrunk.py``) and
appends one class per architecture; ``config.json`` points at them through ``auto_map``, so the
directory loads with plain transformers and no prunekit:

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

The file needs only torch and transformers. Each class is the original transformers class: it is
built from the config as usual, and before its weights are initialised or loaded, every module named
in ``config.shrunk_shapes`` gets the tensor shapes and size attributes (head counts, widths) the
shrunk model had. Widths, head counts and biases may so differ from layer to layer, in any family
transformers ships, with the forward pass the family's own.
"""

from __future__ import annotations

import torch
import transformers  # noqa: F401 - the classes appended to the copied file derive from its models
from torch import nn

SHAPES_KEY = "shrunk_shapes"


def resize_modules(model: nn.Module, shapes: dict) -> None:
    """Give each listed module the recorded tensor shapes (uninitialised) and attribute values."""
    modules = dict(model.named_modules())
    for name, entry in shapes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{SHAPES_KEY} names a module '{name}' that the model does not have")
        if entry["type"] not in {cls.__name__ for cls in type(module).__mro__}:
            raise ValueError(f"module '{name}' is a {type(module).__name__}, but {SHAPES_KEY} describes a "
                             f"{entry['type']}")
        for key, value in entry.get("attributes", {}).items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
        for key, shape in entry.get("tensors", {}).items():
            current = module._parameters.get(key, module._buffers.get(key))
            if shape is None:
                if key in module._parameters:
                    module._parameters[key] = None
                else:
                    module._buffers[key] = None
                continue
            dtype = current.dtype if current is not None else torch.get_default_dtype()
            device = current.device if current is not None else None
            empty = torch.empty(shape, dtype=dtype, device=device)
            if key in module._buffers and module._buffers[key] is not None:
                module._buffers[key] = empty
            else:
                module._parameters[key] = nn.Parameter(empty, requires_grad=dtype.is_floating_point)


class ShrunkModelMixin:
    """Resizes the modules the config lists right before transformers initialises the weights."""

    def post_init(self):
        resize_modules(self, getattr(self.config, SHAPES_KEY, None) or {})
        super().post_init()

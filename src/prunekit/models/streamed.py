"""A model whose weights stay on disk until a step needs them: one block in memory at a time."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.shards import ShardedCheckpoint
from prunekit.models.base import ModelAdapter, adapter_for


class StreamedModel:
    """A meta-device skeleton of a causal LM plus its memory-mapped checkpoint.

    ``materialize(module)`` loads a module's tensors from disk; ``release(module)`` returns them
    to the meta device, so resident memory stays at what is materialised at the moment.
    """

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, blocks: str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        self.checkpoint = ShardedCheckpoint(self.directory)
        try:
            self.config = AutoConfig.from_pretrained(self.directory, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise PrunekitError(f"could not read the config of {self.directory}: {exc}") from None
        self.dtype = dtype or getattr(self.config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        self.device = torch.device(device)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code)
        self.model.eval()
        # Buffers computed at construction (rotary frequencies) are real; move them once.
        for name, buffer in list(self.model.named_buffers()):
            if buffer.device.type != "meta":
                set_module_tensor_to_device(self.model, name, self.device, value=buffer)
        self.adapter: ModelAdapter = adapter_for(self.model, blocks=blocks)
        head = self.adapter.head()
        head_stored = head is not None and f"{self.adapter.head_path}.weight" in self.checkpoint
        self.tied = head is not None and not head_stored
        if self.tied:
            head.weight = self.adapter.embeddings().weight

    def prefix_of(self, module: nn.Module) -> str:
        if not hasattr(self, "_prefixes"):
            self._prefixes = {id(m): name for name, m in self.model.named_modules()}
        return self._prefixes[id(module)]

    def tensor_names(self, module: nn.Module) -> list[str]:
        """Full names of the module's parameters and of its buffers the checkpoint stores."""
        prefix = self.prefix_of(module)

        def full(local: str) -> str:
            return f"{prefix}.{local}" if prefix else local

        names = [full(n) for n, _ in module.named_parameters()]
        return names + [full(n) for n, _ in module.named_buffers() if full(n) in self.checkpoint]

    def materialize(self, module: nn.Module) -> None:
        for name in self.tensor_names(module):
            value = self.checkpoint.get(name)
            set_module_tensor_to_device(self.model, name, self.device,
                                        value=value.to(self.dtype) if value.is_floating_point() else value)

    def release(self, module: nn.Module) -> None:
        for name in self.tensor_names(module):
            set_module_tensor_to_device(self.model, name, "meta")

    @contextlib.contextmanager
    def loaded(self, *modules: nn.Module) -> Iterator[None]:
        for module in modules:
            self.materialize(module)
        try:
            yield
        finally:
            for module in modules:
                self.release(module)

    def outside_blocks(self) -> list[str]:
        """Checkpoint tensors that belong to no block (embeddings, final norm, head, ...)."""
        prefix = self.adapter.blocks_prefix + "."
        return [name for name in self.checkpoint.names() if not name.startswith(prefix)]

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = f"{self.adapter.block_name(index)}."
        return [name for name in self.checkpoint.names() if name.startswith(prefix)]

    def capture_modules(self) -> list[nn.Module]:
        """What capturing the blocks' inputs runs: everything before and after the blocks but the head, and the
        first block (run once to show what a block returns)."""
        return [*self.modules_outside_blocks(head=False), self.adapter.blocks()[0]]

    def modules_outside_blocks(self, head: bool = True) -> list[nn.Module]:
        """Every module holding parameters outside the blocks; the head only when asked for (and not tied:
        a tied head's weight belongs to the embeddings)."""
        blocks = self.adapter.blocks()
        head_module = self.adapter.head()
        skip = {id(head_module)} if (self.tied or not head) and head_module is not None else set()
        modules = []
        for _, child in self.model.named_children():
            modules.extend(_leaves_outside(child, blocks, skip))
        return [m for m in modules if any(True for _ in m.parameters(recurse=False))]


def _leaves_outside(module: nn.Module, blocks: nn.ModuleList, skip: set[int]) -> list[nn.Module]:
    if module is blocks or id(module) in skip:
        return []
    found = [module] if any(True for _ in module.parameters(recurse=False)) else []
    for child in module.children():
        found.extend(_leaves_outside(child, blocks, skip))
    return found

"""Reading a block's attention: the queries and keys its attention kernel really received.

Anything that ranks tokens by attention (token reduction, say) needs attention probabilities, which fast
kernels never materialise. Re-deriving queries and keys from the projections would mean re-implementing
every family's position handling (rotary, partial rotary, interleaved rotary, q/k norms, latent attention,
absolute positions added at the embeddings). Instead the attention runs exactly as the model runs it, and the
inputs of its kernel are recorded: transformers dispatches attention through one table of kernels
(``ALL_ATTENTION_FUNCTIONS``) chosen by ``config._attn_implementation``. While a reading is armed, that
choice names a recording kernel, which notes the query, key, mask, scaling, soft-capping and sink logits,
then calls the kernel the model was using, so the block's output is bit for bit what it would have been.

An attention that computes its scores in its own code (BLOOM's ALiBi, DeBERTa's relative positions, ...)
cannot be read this way and is named as such; so is a block without attention (a convolution or state-space
layer) and one that mixes tokens with such a layer besides its attention.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter
from prunekit.models.layout import CONFIG_LAYERS, config_value

READING_KERNEL = "prunekit_reading"
# Implementations whose kernels take the queries and keys prunekit records (and an additive mask).
READABLE_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class KernelInputs:
    """What one call of an attention kernel received."""

    query: torch.Tensor  # (batch, heads, queries, head_dim), after rotary embedding and query norms
    key: torch.Tensor  # (batch, key_heads, keys, head_dim), including what the cache held before this call
    scaling: float
    mask: torch.Tensor | None  # as the kernel got it: bool (True = attend) or additive, (batch|1, heads|1, q, k)
    softcap: float | None = None  # logits pass through softcap * tanh(logits / softcap) (Gemma 2)
    sinks: torch.Tensor | None = None  # (heads,) logit of an attention sink that takes probability mass (gpt-oss)


class _Reading:
    """One armed reading: the kernel calls it recorded and the kernel each module was really using."""

    def __init__(self, implementations: dict[int, str | None]):
        self.implementations = implementations  # id(config) -> the implementation it named before arming
        self.calls: list[KernelInputs] = []

    def real_kernel(self, module: nn.Module) -> Callable[..., Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        implementation = self.implementations.get(id(getattr(module, "config", None)))
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if implementation in (None, "eager"):
            if eager is None:
                raise PrunekitError(f"{type(module).__name__} has no eager attention kernel prunekit can call")
            return eager
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


_ARMED: list[_Reading] = []


def _recording_kernel(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any):
    if not _ARMED:
        raise RuntimeError("prunekit's attention reading kernel ran outside a reading")
    reading = _ARMED[-1]
    scaling = kwargs.get("scaling")
    sinks = kwargs.get("s_aux")
    reading.calls.append(KernelInputs(query, key, float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
                                      attention_mask, kwargs.get("softcap"),
                                      sinks if isinstance(sinks, torch.Tensor) else None))
    return reading.real_kernel(module)(module, query, key, value, attention_mask, **kwargs)


def _register_reading_kernel() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if READING_KERNEL not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(READING_KERNEL, _recording_kernel)


def dispatches_through_kernels(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) picks its attention kernel from transformers' table."""
    for inner in module.modules():
        modeling = sys.modules.get(type(inner).__module__)
        if (hasattr(inner, "config") and modeling is not None and hasattr(modeling, "ALL_ATTENTION_FUNCTIONS")
                and hasattr(modeling, "eager_attention_forward")):
            return True
    return False


class AttentionReader:
    """Records the kernel inputs of one attention module's forward while a reading is armed."""

    def __init__(self, attention: nn.Module, name: str):
        _register_reading_kernel()
        self.attention = attention
        self.name = name
        self._configs = list({id(m.config): m.config for m in attention.modules()
                              if getattr(m, "config", None) is not None}.values())

    @contextmanager
    def reading(self) -> Iterator[list[KernelInputs]]:
        """Within the block: run the attention as usual; afterwards the list holds its kernel call(s)."""
        reading = _Reading({id(config): config._attn_implementation for config in self._configs})
        _ARMED.append(reading)
        for config in self._configs:
            config._attn_implementation = READING_KERNEL
        try:
            yield reading.calls
        finally:
            for config in self._configs:
                config._attn_implementation = reading.implementations[id(config)]
            _ARMED.pop()

    def single_call(self, calls: list[KernelInputs]) -> KernelInputs:
        """The one kernel call a reading must have seen."""
        if len(calls) != 1:
            seen = "no kernel call" if not calls else f"{len(calls)} kernel calls"
            raise PrunekitError(f"{self.name} made {seen} where prunekit expected one, so it cannot tell which "
                                "queries and keys the attention used")
        return calls[0]


def token_mixers(block: nn.Module, attention: nn.Module | None) -> list[str]:
    """Class names of the parts of ``block`` that mix tokens by convolution or a state-space scan (hybrid
    blocks): every ``nn.Conv1d`` over the sequence outside the attention. transformers' ``Conv1D`` (GPT-2's
    linear layer) is not one."""
    inside_attention = {id(m) for m in attention.modules()} if attention is not None else set()
    found: list[str] = []
    for _, child in block.named_children():
        if id(child) in inside_attention:
            continue
        if any(isinstance(m, nn.Conv1d) and id(m) not in inside_attention for m in child.modules()):
            found.append(type(child).__name__)
    return found


def block_attention(adapter: ModelAdapter, index: int) -> tuple[nn.Module | None, str]:
    """Block ``index``'s attention module (None when it has none) and its name from the model root."""
    parts = adapter.block_parts(index).attention
    if parts is None:
        return None, ""
    return adapter.blocks()[index].get_submodule(parts.module), f"{adapter.block_name(index)}.{parts.module}"


def attention_problem(adapter: ModelAdapter, index: int) -> str | None:
    """Why block ``index``'s attention cannot be read (one line), or None when it can."""
    block = adapter.blocks()[index]
    attention, name = block_attention(adapter, index)
    if attention is None:
        mixers = token_mixers(block, None)
        mixing = f" (it mixes tokens with {', '.join(mixers)})" if mixers else ""
        return f"block {index} ({type(block).__name__}) has no attention{mixing}"
    mixers = token_mixers(block, attention)
    if mixers:
        return (f"block {index} mixes tokens with {', '.join(mixers)} besides its attention, a convolution or "
                "state-space layer whose state prunekit does not follow")
    if not dispatches_through_kernels(attention):
        return (f"{type(attention).__name__} computes its attention scores in its own code rather than through "
                "transformers' attention kernels, so prunekit cannot read the queries and keys it uses")
    return None


def attention_reader(adapter: ModelAdapter, index: int) -> AttentionReader:
    """A reader of block ``index``'s attention; a ``PrunekitError`` naming why when there is none."""
    problem = attention_problem(adapter, index)
    if problem is not None:
        raise PrunekitError(problem)
    attention, name = block_attention(adapter, index)
    return AttentionReader(attention, name)


def shared_blocks(adapter: ModelAdapter) -> str | None:
    """Why the blocks are not the layers the model runs (ALBERT runs one shared group many times), or None."""
    layers, _ = config_value(adapter.config, CONFIG_LAYERS)
    count = len(adapter.blocks())
    if isinstance(layers, int) and layers != count:
        return (f"{type(adapter.model).__name__} runs {layers} layers from {count} block(s) of shared weights, so "
                "a block is not one position in the stack")
    return None


def is_causal(adapter: ModelAdapter) -> bool:
    """Whether the model's self-attention is causal (a decoder), read from its attention modules where they say
    so, else from whether the model generates text."""
    for index in range(len(adapter.blocks())):
        attention, _ = block_attention(adapter, index)
        if attention is None:
            continue
        for module in attention.modules():
            flag = getattr(module, "is_causal", None)
            if isinstance(flag, bool):
                return flag
    can_generate = getattr(adapter.model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False

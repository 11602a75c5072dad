"""Hugging Face causal language models at prefill (FastV-style), any whose blocks the model adapter finds and
whose attention it can read: prompt tokens are pruned once the prompt has gone through the first blocks, and
the key/value cache of the later blocks holds only the kept tokens.

The prompt is whatever the first forward pass with an empty cache sees. Kept tokens keep their original
positions (the rotary tables and position ids of the later blocks follow them; absolute positions were added
at the embeddings already), and the first and last real tokens (the attention sink, and the query that
starts generation) are protected. Rows stay right-aligned, so the last position of every row is its last
real token and ``logits[:, -1]`` is the next-token prediction as usual. The later blocks' masks are the
model's own masks (causal, sliding window, padding) restricted to the kept tokens.

Later forward passes that extend the cache (``generate``'s decoding steps, or a continuation fed in one go)
attend to the kept prompt tokens of each block; tokens after the prompt are never pruned. Each block whose
cache holds a pruned prompt gets a mask built from the original positions of what its cache holds: a key is
visible when it is real, not after the query and, in a sliding-window layer, within the window.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.block_call import BlockCall, gather_mask
from prunekit.tokens.families.base import FAMILIES
from prunekit.tokens.families.hf import BlockReduction, HFFamily, argument
from prunekit.tokens.state import additive_mask

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch
    from prunekit.tokens.state import TokenState

# What the key/value cache is called in a model's forward arguments: ``cache`` in newer transformers 5.x (the old
# name still accepted, with a deprecation warning), ``past_key_values`` before.
CACHE_NAMES = ("cache", "past_key_values")


@dataclass
class _Prompt:
    """What the prefill left in each block's cache, so later passes can mask it correctly."""

    length: int = 0  # tokens in the prompt
    batch: int = 0
    seen: int = 0  # tokens the cache holds in the model's own count (prompt and everything after it)
    decoding: bool = False
    # for every block whose cache holds a pruned prompt: the original position of each cached entry (-1: padding)
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    query_positions: torch.Tensor | None = None  # (batch, queries) of the current pass after the prompt
    query_valid: torch.Tensor | None = None


@FAMILIES.register("causal-lm")
class CausalLM(HFFamily):
    name: ClassVar[str] = "causal-lm"
    description: ClassVar[str] = "Hugging Face causal language models at prefill (any decoder found by structure)"
    causal: ClassVar[bool] = True
    anchor: ClassVar[str] = "last"
    has_cls: ClassVar[bool] = False
    supports_merging: ClassVar[bool] = False
    protect_last: ClassVar[int] = 1

    def protection_rule(self, protect_ids: Sequence[int] = ()) -> str:
        rule = "the first real token (attention sink) and the last (the query that starts generation)"
        if protect_ids:
            rule += f", token ids {sorted(set(protect_ids))}"
        return rule + "; padding is never kept in place of a real token; tokens after the prompt are never pruned"

    def after_blocks_problem(self) -> str | None:
        """Runs the model on two tokens with one removed after the last block: some models reshape the final
        hidden states to the input's shape (GPT-2 and GPT-BigCode do), which no removed token survives."""
        finished: list[bool] = []

        def drop_first(_module: nn.Module, _args: tuple, output: Any) -> Any:
            finished.append(True)
            if isinstance(output, torch.Tensor):
                return output[:, 1:]
            return (output[0][:, 1:], *output[1:])

        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else None
        handle = self.layers()[-1].register_forward_hook(drop_first)
        try:
            with torch.no_grad():
                self.model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=False)
        except Exception as exc:  # whatever the model's code after its blocks raises, the answer is the same
            if not finished:
                return None  # it failed before the blocks were through: not what this asks
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return (f"its code after the blocks expects as many tokens as the model was given ({detail}), so "
                    "removed tokens cannot leave it")
        finally:
            handle.remove()
        return None

    def install_hooks(self, patch: "TokenPatch") -> None:
        self.prompt = _Prompt()
        super().install_hooks(patch)

    def begin_pass(self, patch: "TokenPatch", module: nn.Module, arguments: dict[str, Any]) -> None:
        prompt = self.prompt
        if module is self.model and argument(arguments, "labels") is not None:
            raise PrunekitError("with prompt tokens pruned the logits cover only the kept positions; compute the "
                                "loss from the logits and patch.kept_positions() instead of passing labels")
        cache = argument(arguments, *CACHE_NAMES)
        _check_cache_kind(cache)
        past = cache.get_seq_length() if cache is not None else 0
        mask = argument(arguments, "attention_mask")
        if mask is not None and mask.dim() != 2:
            raise PrunekitError(f"token reduction needs a 2-D padding mask (batch, tokens); got {mask.dim()}-D")
        if past == 0:
            prompt.decoding = False
            prompt.positions.clear()
            patch.start(valid=mask, input_ids=argument(arguments, "input_ids"))
            return
        if prompt.length == 0 or past != prompt.seen:
            raise PrunekitError("this key/value cache was not filled by a prefill of the patched model; run the "
                                "prompt through the patched model first")
        inputs = argument(arguments, "input_ids")
        if inputs is None:
            inputs = argument(arguments, "inputs_embeds")
        if inputs is not None and inputs.shape[0] != prompt.batch:
            raise PrunekitError(f"the cache holds {prompt.batch} pruned prompts but {inputs.shape[0]} sequences came "
                                "in; decode with the batch the prefill used")
        queries = inputs.shape[1] if inputs is not None else 1
        device = inputs.device if inputs is not None else None
        positions = torch.arange(past, past + queries, device=device).expand(prompt.batch, queries)
        if mask is None:
            valid = torch.ones(prompt.batch, queries, dtype=torch.bool, device=device)
        elif mask.shape[1] != past + queries:
            raise PrunekitError(f"the attention mask covers {mask.shape[1]} tokens, but the cache holds {past} and "
                                f"{queries} came in")
        else:
            valid = mask[:, past:].bool()
        prompt.decoding = True
        prompt.query_positions, prompt.query_valid = positions, valid
        prompt.seen = past + queries

    def block_forward(self, patch: "TokenPatch", index: int, reduction: BlockReduction | None):
        prompt = self.prompt

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            signature = inspect.signature(original)

            def forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
                if prompt.decoding:
                    if index not in prompt.positions:
                        return original(*args, **kwargs)
                    return _decode(prompt, index, BlockCall.bind(signature, args, kwargs), original)
                hidden = BlockCall.hidden_of(signature, args, kwargs)
                state = patch.state_for(hidden)
                if index == 0:
                    prompt.length = prompt.seen = hidden.shape[1]
                    prompt.batch = hidden.shape[0]
                # a reducing block that removes nothing (ratio 0, or too few tokens left) runs as any other
                remove = patch.removal(index, state) if reduction is not None else None
                if not state.reduced and remove is None:
                    return original(*args, **kwargs)
                call = BlockCall.bind(signature, args, kwargs)
                if state.reduced:
                    prompt.positions[index] = state.source
                    call = call.follow_tokens(hidden, state.source, prompt.length)
                    call = call.with_mask(_prefill_mask(call.mask, state, hidden.dtype))
                if remove is None:
                    return call.run(original)
                return reduction.run(patch, block, original, call, state, remove)

            return forward

        return make


def _prefill_mask(mask: torch.Tensor | None, state: "TokenState", dtype: torch.dtype) -> torch.Tensor | None:
    """The model's mask for this block restricted to the kept tokens, padding keys masked out. Without a mask
    (sdpa's causal kernel) and without padding none is needed: the kept tokens are in their original order."""
    if mask is None:
        return state.causal_bias(dtype) if state.has_padding() else None
    kept = additive_mask(gather_mask(mask, state.source), dtype)
    return kept.masked_fill(~state.valid[:, None, None, :], torch.finfo(dtype).min)


def _check_cache_kind(cache: Any) -> None:
    """A pruned prompt leaves a different length in each block's cache, which only a cache that grows by
    concatenation (``DynamicCache``, generate's default; its sliding-window layers keep the newest entries)
    can hold."""
    if cache is None:
        return
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or layers is None or not all(
            isinstance(layer, DynamicLayer) and not getattr(layer, "record_past", False) for layer in layers):
        raise PrunekitError(f"prefill token pruning leaves each block's cache a different length, which only a "
                            f"DynamicCache (the default) can hold; got {type(cache).__name__}: leave the cache out "
                            "(and cache_implementation unset), or pass a DynamicCache")


def _decode(prompt: _Prompt, index: int, call: BlockCall, forward: Callable[..., Any]) -> Any:
    """A pass after the prompt through a block whose cache holds a pruned prompt."""
    cache = call.cache
    layer = cache.layers[index] if cache is not None and index < len(cache.layers) else None
    stored = layer.keys.shape[-2] if layer is not None and getattr(layer, "is_initialized", False) else None
    positions = prompt.positions[index]
    window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
    if stored is not None and window is not None and positions.shape[1] > stored:
        positions = positions[:, -stored:]  # a sliding-window layer keeps only its newest entries
    if stored != positions.shape[1]:
        raise PrunekitError("this key/value cache does not match the patched prefill (was it filled by another model "
                            "or reordered?); run the prompt through the patched model again")
    queries, valid = prompt.query_positions, prompt.query_valid
    keys = torch.cat([positions, torch.where(valid, queries, -1)], dim=1)
    allowed = (keys[:, None, :] >= 0) & (keys[:, None, :] <= queries[:, :, None])
    if window is not None:
        allowed &= queries[:, :, None] - keys[:, None, :] < window
    dtype = call.hidden.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=call.hidden.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    output = call.with_mask(mask[:, None]).run(forward)
    prompt.positions[index] = keys
    return output

"""Llama-style decoders at prefill (FastV-style): prompt tokens are pruned once the prompt has gone
through the first blocks; the key/value cache of later blocks holds only the kept tokens.

The prompt is whatever the first forward pass with an empty cache sees. Kept tokens keep their
original rotary positions, and the first and last real tokens (the attention sink, and the query
that starts generation) are protected. Rows stay right-aligned, so the last position of every row
is its last real token and ``logits[:, -1]`` is the next-token prediction as usual. Later forward
passes that extend the cache (``generate``'s decoding steps, or a continuation fed in one go) attend
to the kept prompt tokens of each block; tokens after the prompt are never pruned.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.tokens.attention import AttentionView
from prunekit.tokens.families.base import FAMILIES, ProjectionCapture, TokenFamily, base_model

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch

MODEL_TYPES = ("llama",)
# What the key/value cache is called in the forward arguments: ``cache`` in newer transformers 5.x (the old
# name still accepted, with a deprecation warning), ``past_key_values`` before.
CACHE_NAMES = ("cache", "past_key_values")


@dataclass
class _Prefill:
    """What the prefill left in each block's cache, so decoding steps can mask it correctly."""

    prompt_length: int = 0
    batch: int = 0
    mask_was_none: bool = False
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)  # real prompt tokens each block cached
    reduced_layers: set[int] = field(default_factory=set)  # blocks that cached a pruned prompt
    decoding: bool = False
    past_length: int = 0


@FAMILIES.register("llama")
class LlamaDecoder(TokenFamily):
    name: ClassVar[str] = "llama"
    description: ClassVar[str] = "Hugging Face Llama-style decoders at prefill (LlamaForCausalLM, LlamaModel)"
    causal: ClassVar[bool] = True
    anchor: ClassVar[str] = "last"
    has_cls: ClassVar[bool] = False
    supports_merging: ClassVar[bool] = False
    protect_last: ClassVar[int] = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in MODEL_TYPES:
            return False
        return isinstance(getattr(base_model(model), "layers", None), nn.ModuleList)

    def layers(self) -> Sequence[nn.Module]:
        return list(base_model(self.model).layers)

    def protection_rule(self, protect_ids: Sequence[int] = ()) -> str:
        rule = "the first real token (attention sink) and the last (the query that starts generation)"
        if protect_ids:
            rule += f", token ids {sorted(set(protect_ids))}"
        return rule + "; padding is never kept in place of a real token; tokens after the prompt are never pruned"

    def install(self, patch: "TokenPatch") -> None:
        backbone = base_model(self.model)
        signature = inspect.signature(backbone.forward)
        prefill = _Prefill()

        if self.model is not backbone:
            def refuse_labels(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                if kwargs.get("labels") is not None:
                    raise PrunekitError("with prompt tokens pruned the logits cover only the kept positions; compute "
                                        "the loss from the logits and patch.kept_positions() instead of passing labels")

            patch.add_handle(self.model.register_forward_pre_hook(refuse_labels, with_kwargs=True))

        def begin(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            cache = _argument(bound, *CACHE_NAMES)
            _check_cache_kind(cache)
            past = cache.get_seq_length() if cache is not None else 0
            mask = _argument(bound, "attention_mask")
            if mask is not None and mask.dim() != 2:
                raise PrunekitError(f"token reduction needs a 2-D padding mask (batch, tokens); got {mask.dim()}-D")
            if past == 0:
                prefill.decoding = False
                prefill.layer_valid.clear()
                prefill.reduced_layers.clear()
                patch.start(valid=mask, input_ids=_argument(bound, "input_ids"))
                return
            if not prefill.layer_valid or prefill.past_length > past or past < prefill.prompt_length:
                raise PrunekitError("this key/value cache was not filled by a prefill of the patched model; run the "
                                    "prompt through the patched model first")
            inputs = _argument(bound, "input_ids")
            if inputs is None:
                inputs = _argument(bound, "inputs_embeds")
            if inputs is not None and inputs.shape[0] != prefill.batch:
                raise PrunekitError(f"the cache holds {prefill.batch} pruned prompts but {inputs.shape[0]} sequences "
                                    "came in; decode with the batch the prefill used")
            prefill.decoding = True
            prefill.past_length = past

        patch.add_handle(backbone.register_forward_pre_hook(begin, with_kwargs=True))
        for index, layer in enumerate(self.layers()):
            capture = None
            if patch.reduces_at(index):
                capture = ProjectionCapture(patch, {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj})
            patch.replace_forward(layer, _layer_forward(patch, index, capture, prefill))


def _argument(arguments: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` given (not None) among bound arguments, or in their ``**kwargs``."""
    extra = arguments.get("kwargs")
    for name in names:
        if arguments.get(name) is not None:
            return arguments[name]
        if isinstance(extra, dict) and extra.get(name) is not None:
            return extra[name]
    return None


def _check_cache_kind(cache: Any) -> None:
    """A pruned prompt leaves a different length in each block's cache, which only a cache that grows by
    concatenation (``DynamicCache``, generate's default) can hold."""
    if cache is None:
        return
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache) or any(getattr(cache, "is_sliding", None) or ()):
        raise PrunekitError(f"prefill token pruning leaves each block's cache a different length, which only a "
                            f"DynamicCache (the default) can hold; got {type(cache).__name__}: leave the cache out "
                            "(and cache_implementation unset), or pass a DynamicCache")


def _gather_tokens(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Select per-token rows (batch or 1, tokens, ...) at the original positions ``source`` (batch, kept)."""
    expanded = tensor.expand(source.shape[0], *tensor.shape[1:])
    index = source.view(*source.shape, *([1] * (tensor.dim() - 2))).expand(*source.shape, *tensor.shape[2:])
    return expanded.gather(1, index)


def _decode_mask(prefill: _Prefill, index: int, mask: torch.Tensor | None, hidden: torch.Tensor,
                 cache: Any) -> torch.Tensor:
    """Mask for tokens after the prompt in a block whose cache holds a pruned prompt: every kept
    prompt token is visible; among the later tokens, the model's own (causal, padding) mask holds."""
    batch, queries = hidden.shape[:2]
    prompt_valid = prefill.layer_valid[index]
    after_prompt = prefill.past_length - prefill.prompt_length + queries
    cached = cache.get_seq_length(index) if cache is not None else None
    if cached != prompt_valid.shape[1] + after_prompt - queries:
        raise PrunekitError("this key/value cache does not match the patched prefill (was it filled by another model "
                            "or reordered?); run the prompt through the patched model again")
    lowest = torch.finfo(hidden.dtype).min
    prompt_part = torch.zeros(batch, 1, queries, prompt_valid.shape[1], dtype=hidden.dtype, device=hidden.device)
    prompt_part = prompt_part.masked_fill(~prompt_valid[:, None, None, :], lowest)
    if mask is None:
        offset = after_prompt - queries
        allowed = (torch.arange(after_prompt, device=hidden.device)[None, :]
                   <= torch.arange(queries, device=hidden.device)[:, None] + offset)
        later = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~allowed, lowest)
        later = later[None, None].expand(batch, 1, -1, -1)
    else:
        later = mask[..., -after_prompt:]
        if later.dtype == torch.bool:
            later = torch.zeros(later.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~later, lowest)
        later = later.to(hidden.dtype).expand(batch, 1, queries, after_prompt)
    return torch.cat([prompt_part, later], dim=-1)


def _layer_forward(patch: "TokenPatch", index: int, capture: ProjectionCapture | None, prefill: _Prefill):
    def make(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
            # The cache arrives as ``cache`` (newer transformers 5.x) or ``past_key_values`` (before); it is passed
            # on under the name it came with, and every other argument (use_cache, cache_position, ...) as is.
            cache = _argument(kwargs, *CACHE_NAMES)
            position_embeddings = kwargs.pop("position_embeddings", None)
            if prefill.decoding:
                if index in prefill.reduced_layers:
                    attention_mask = _decode_mask(prefill, index, attention_mask, hidden_states, cache)
                return original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                position_embeddings=position_embeddings, **kwargs)
            state = patch.state_for(hidden_states)
            if index == 0:
                prefill.prompt_length = hidden_states.shape[1]
                prefill.batch = hidden_states.shape[0]
                prefill.mask_was_none = attention_mask is None
                prefill.past_length = 0
            prefill.layer_valid[index] = state.valid
            if state.reduced:
                prefill.reduced_layers.add(index)
                source = state.source.clamp_min(0)
                position_embeddings = tuple(_gather_tokens(part, source) for part in position_embeddings)
                if position_ids is not None:
                    position_ids = _gather_tokens(position_ids, source)
                if kwargs.get("cache_position") is not None:
                    # older transformers: the cache writes at these slots (a DynamicCache ignores them)
                    kwargs["cache_position"] = kwargs["cache_position"][:hidden_states.shape[1]]
                if prefill.mask_was_none and not state.has_padding():
                    attention_mask = None  # sdpa's own causal kernel, as the unpatched model uses
                else:
                    attention_mask = state.causal_bias(hidden_states.dtype)
            if capture is None:
                return original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                position_embeddings=position_embeddings, **kwargs)
            # LlamaDecoderLayer.forward, split after attention so the tokens can shrink before the MLP.
            residual = hidden_states
            hidden_states = layer.input_layernorm(hidden_states)
            with capture:
                hidden_states, _ = layer.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                                   position_ids=position_ids, position_embeddings=position_embeddings,
                                                   **kwargs)
            hidden_states = residual + hidden_states
            attention = layer.self_attn
            query = capture.heads("q", attention.head_dim)
            key = capture.heads("k", attention.head_dim)
            rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
            query, key = rotate(query, key, *position_embeddings)
            view = AttentionView(query, key, attention.scaling, state, causal=True)
            hidden_states = patch.reduce(index, hidden_states, view)
            residual = hidden_states
            hidden_states = layer.post_attention_layernorm(hidden_states)
            hidden_states = layer.mlp(hidden_states)
            return residual + hidden_states

        return forward

    return make

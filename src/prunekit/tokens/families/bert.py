"""Hugging Face BERT-style encoders (BERT, RoBERTa; e.g. all-MiniLM-L6-v2): post-norm layers.

The padding mask given to the model is honoured: padding is never kept in place of a real token,
and each sequence loses its share of its own real tokens. [CLS] (the first real token) and [SEP]
(the last) are protected; pass ``protect_ids`` for other special tokens.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.tokens.attention import AttentionView
from prunekit.tokens.families.base import FAMILIES, ProjectionCapture, TokenFamily, base_model

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch

MODEL_TYPES = ("bert", "roberta")


@FAMILIES.register("bert")
class BertEncoder(TokenFamily):
    name: ClassVar[str] = "bert"
    description: ClassVar[str] = "Hugging Face BERT-style encoders (BertModel, RobertaModel and their task heads)"
    protect_last: ClassVar[int] = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in MODEL_TYPES:
            return False
        return isinstance(getattr(getattr(base_model(model), "encoder", None), "layer", None), nn.ModuleList)

    def layers(self) -> Sequence[nn.Module]:
        return list(base_model(self.model).encoder.layer)

    def check(self, method) -> None:
        if getattr(self.model.config, "is_decoder", False):
            raise PrunekitError("this BERT-style model is configured as a decoder (is_decoder=True); token reduction "
                                "supports it as an encoder only")
        super().check(method)

    def install(self, patch: "TokenPatch") -> None:
        backbone = base_model(self.model)
        signature = inspect.signature(backbone.forward)

        def begin(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = bound.get("kwargs") or {}
            # the cache is called ``cache`` in newer transformers 5.x, ``past_key_values`` before
            if any(bound.get(name) is not None or extra.get(name) is not None for name in ("cache", "past_key_values")):
                raise PrunekitError("token reduction in an encoder does not take a key/value cache")
            mask = bound.get("attention_mask")
            if mask is not None and mask.dim() != 2:
                raise PrunekitError(f"token reduction needs a 2-D padding mask (batch, tokens); got {mask.dim()}-D")
            patch.start(valid=mask, input_ids=bound.get("input_ids"))

        patch.add_handle(backbone.register_forward_pre_hook(begin, with_kwargs=True))
        for index, layer in enumerate(self.layers()):
            capture = None
            if patch.reduces_at(index):
                capture = ProjectionCapture(patch, {"q": layer.attention.self.query, "k": layer.attention.self.key})
            patch.replace_forward(layer, _layer_forward(patch, index, capture))


def _layer_forward(patch: "TokenPatch", index: int, capture: ProjectionCapture | None):
    def make(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *args: Any, **kwargs: Any) -> torch.Tensor:
            state = patch.state_for(hidden_states)
            if state.reduced:
                attention_mask = state.key_bias(hidden_states.dtype)
            if capture is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            from transformers.pytorch_utils import apply_chunking_to_forward

            kwargs.pop("encoder_attention_mask", None)
            # BertLayer.forward, split after attention so the tokens can shrink before the MLP.
            with capture:
                attention_output, _ = layer.attention(hidden_states, attention_mask, **kwargs)
            self_attention = layer.attention.self
            head_dim = self_attention.attention_head_size
            view = AttentionView(capture.heads("q", head_dim), capture.heads("k", head_dim), self_attention.scaling,
                                 state, causal=False)
            attention_output = patch.reduce(index, attention_output, view)
            return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward,
                                             layer.seq_len_dim, attention_output)

        return forward

    return make

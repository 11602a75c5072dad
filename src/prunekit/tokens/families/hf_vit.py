"""Hugging Face ViT (``ViTModel``, ``ViTForImageClassification``): pre-norm layers, [CLS] first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from prunekit.tokens.attention import AttentionView
from prunekit.tokens.families.base import FAMILIES, ProjectionCapture, TokenFamily, base_model

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch


@FAMILIES.register("hf-vit")
class HFViT(TokenFamily):
    name: ClassVar[str] = "hf-vit"
    description: ClassVar[str] = "Hugging Face ViT (ViTModel, ViTForImageClassification)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) == "vit" and _layer_list(base_model(model)) is not None

    def layers(self) -> Sequence[nn.Module]:
        return list(_layer_list(base_model(self.model)))

    def install(self, patch: "TokenPatch") -> None:
        backbone = base_model(self.model)
        patch.add_handle(backbone.register_forward_pre_hook(lambda _module, _args: patch.start()))
        for index, layer in enumerate(self.layers()):
            capture = None
            if patch.reduces_at(index):
                capture = ProjectionCapture(patch, {"q": layer.attention.q_proj, "k": layer.attention.k_proj})
            patch.replace_forward(layer, _layer_forward(patch, index, capture))


def _layer_list(backbone: nn.Module) -> nn.ModuleList | None:
    layers = getattr(backbone, "layers", None)
    if layers is None:  # transformers 4.x keeps them in encoder.layer
        layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _layer_forward(patch: "TokenPatch", index: int, capture: ProjectionCapture | None):
    def make(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
            state = patch.state_for(hidden_states)
            if state.reduced:
                attention_mask = state.key_bias(hidden_states.dtype)
            if capture is None:
                return original(hidden_states, attention_mask, **kwargs)
            # ViTLayer.forward, split after attention so the tokens can shrink before the MLP.
            residual = hidden_states
            hidden_states = layer.layernorm_before(hidden_states)
            with capture:
                hidden_states, _ = layer.attention(hidden_states, attention_mask, **kwargs)
            hidden_states = layer.dropout(hidden_states)
            hidden_states = hidden_states + residual
            attention = layer.attention
            view = AttentionView(capture.heads("q", attention.head_dim), capture.heads("k", attention.head_dim),
                                 attention.scaling, state, causal=False)
            hidden_states = patch.reduce(index, hidden_states, view)
            residual = hidden_states
            hidden_states = layer.layernorm_after(hidden_states)
            hidden_states = layer.mlp(hidden_states)
            hidden_states = layer.dropout(hidden_states)
            return hidden_states + residual

        return forward

    return make

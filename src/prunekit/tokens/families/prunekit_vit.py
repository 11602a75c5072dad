"""prunekit's own ViT (``prunekit.models.vit.ViT``): pre-norm blocks, [CLS] first, no padding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.tokens.attention import AttentionView
from prunekit.tokens.families.base import FAMILIES, TokenFamily

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch


@FAMILIES.register("prunekit-vit")
class PrunekitViT(TokenFamily):
    name: ClassVar[str] = "prunekit-vit"
    description: ClassVar[str] = "prunekit's ViT (prunekit.models.vit.ViT)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from prunekit.models.vit import ViT

        return isinstance(model, ViT)

    def layers(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def install(self, patch: "TokenPatch") -> None:
        patch.add_handle(self.model.register_forward_pre_hook(lambda _module, _args: patch.start()))
        for index, block in enumerate(self.model.blocks):
            patch.replace_forward(block, _block_forward(patch, index))


def _block_forward(patch: "TokenPatch", index: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            state = patch.state_for(x)
            bias = state.key_bias(x.dtype)
            remove = patch.removal(index, state)  # None also in a reducing block that removes nothing (ratio 0)
            if bias is None and remove is None:
                return original(x)
            attn = block.attn
            q, k, v = attn.split_heads(block.norm1(x))
            x = x + attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
            if remove is not None:
                x = patch.reduce(index, x, AttentionView(q, k, attn.head_dim ** -0.5, state, causal=False), remove)
            return x + block.mlp(block.norm2(x))

        return forward

    return make

"""What a model family must say for token reduction to run inside it.

A family knows where the blocks are, how one block splits into attention and MLP (the reduction
happens between them), how to read the block's queries and keys, which tokens are protected, and
how to build the attention mask once tokens are gone. A new architecture is a new file here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError
from prunekit.tokens.base import METHODS, TokenMethod

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch

FAMILIES: Registry[type["TokenFamily"]] = Registry("token-pruning model family", ("prunekit.tokens.families",))

# Attention implementations whose queries and keys prunekit can read and that accept an additive mask.
READABLE_ATTENTION = ("eager", "sdpa")


class TokenFamily:
    name: ClassVar[str]
    description: ClassVar[str]
    causal: ClassVar[bool] = False
    anchor: ClassVar[str] = "first"  # whose attention row ranks tokens: [CLS] first, or a decoder's last token
    has_cls: ClassVar[bool] = True
    supports_merging: ClassVar[bool] = True
    protect_first: ClassVar[int] = 1
    protect_last: ClassVar[int] = 0

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.layers())

    def attention_implementation(self) -> str | None:
        """The Hugging Face attention implementation in use; None for models with their own attention."""
        config = getattr(self.model, "config", None)
        return getattr(config, "_attn_implementation", None) if config is not None else None

    def model_name(self) -> str:
        return type(self.model).__name__

    def check(self, method: TokenMethod) -> None:
        """Refuse combinations that cannot work, naming what would."""
        usable = [name for name in METHODS.names() if self.can_run(METHODS.get(name))]
        if method.merges and not self.supports_merging:
            raise PrunekitError(f"{method.name} merges tokens, which {self.model_name()} cannot express (a causal "
                                f"decoder's tokens each keep one position in the cache); choose one of: {', '.join(usable)}")
        if method.needs_cls and not self.has_cls:
            raise PrunekitError(f"{method.name} ranks tokens by the attention of a [CLS] token, which "
                                f"{self.model_name()} does not have; choose one of: {', '.join(usable)}")
        implementation = self.attention_implementation()
        if implementation is not None and implementation not in READABLE_ATTENTION:
            switch = ("reload it with attn_implementation='sdpa' (or 'eager'), or call "
                      "model.set_attn_implementation('sdpa')")
            if method.needs & {"attention", "anchor_attention", "keys"}:
                raise PrunekitError(f"{method.name} needs the attention weights of each reducing layer, which prunekit "
                                    f"recomputes from the queries and keys of 'eager' or 'sdpa' attention; this model "
                                    f"uses '{implementation}': {switch}")
            raise PrunekitError(f"token reduction masks removed tokens with an additive attention mask, which "
                                f"'{implementation}' attention cannot take; {switch}")

    @classmethod
    def can_run(cls, method_cls: type[TokenMethod]) -> bool:
        return (cls.supports_merging or not method_cls.merges) and (cls.has_cls or not method_cls.needs_cls)

    def protected(self, valid: torch.Tensor, input_ids: torch.Tensor | None, protect_ids: Sequence[int]) -> torch.Tensor:
        """(batch, tokens) bool: the first ``protect_first`` and last ``protect_last`` real tokens of
        every sequence, and any token whose id is in ``protect_ids``."""
        from_start = torch.cumsum(valid.long(), dim=1) - 1
        from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [1]), dim=1), [1]) - 1
        protected = (from_start < self.protect_first) | (from_end < self.protect_last)
        if protect_ids and input_ids is not None:
            ids = torch.tensor(list(protect_ids), device=input_ids.device)
            protected |= torch.isin(input_ids.to(ids.device), ids).to(valid.device)
        return protected & valid

    def protection_rule(self, protect_ids: Sequence[int] = ()) -> str:
        parts = []
        if self.protect_first:
            parts.append("the first real token" + (" ([CLS])" if self.has_cls else ""))
        if self.protect_last:
            parts.append("the last real token")
        if protect_ids:
            parts.append(f"token ids {sorted(set(protect_ids))}")
        return ", ".join(parts) + "; padding is never kept in place of a real token"

    def install(self, patch: "TokenPatch") -> None:
        raise NotImplementedError


class ProjectionCapture:
    """Keeps the outputs of chosen projections (the query and key linear layers) while armed."""

    def __init__(self, patch: "TokenPatch", modules: dict[str, nn.Module]):
        self.armed = False
        self.outputs: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            patch.add_handle(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.armed:
                self.outputs[name] = output

        return hook

    def __enter__(self) -> "ProjectionCapture":
        self.outputs = {}
        self.armed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.armed = False

    def heads(self, name: str, head_dim: int) -> torch.Tensor:
        """The captured projection as (batch, heads, tokens, head_dim)."""
        output = self.outputs.pop(name)
        batch, tokens, _ = output.shape
        return output.view(batch, tokens, -1, head_dim).transpose(1, 2)


def base_model(model: nn.Module) -> nn.Module:
    """The backbone of a Hugging Face model with a head (``model.base_model``), or the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def find_family(model: nn.Module) -> TokenFamily:
    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        if family.matches(model):
            return family(model)
    supported = "; ".join(FAMILIES.get(name).description for name in FAMILIES.names())
    raise PrunekitError(f"token reduction does not support {type(model).__name__}; supported: {supported}")

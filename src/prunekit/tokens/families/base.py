"""What a model family must say for token reduction to run inside it.

A family is a kind of model, not a list of architectures: Hugging Face encoders and causal language models
are recognised through the model adapter (``prunekit.models``), which says where the blocks and their
attention are, reads the queries and keys their attention kernels receive and splits a block around its
attention. The family keeps the mechanics of one kind: which tokens are protected, how the attention mask and
positions follow the kept tokens, and (for decoders) how decoding goes on after a pruned prefill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError
from prunekit.models.attention import READABLE_IMPLEMENTATIONS
from prunekit.tokens.base import METHODS, TokenMethod

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch

FAMILIES: Registry[type["TokenFamily"]] = Registry("token-pruning model family", ("prunekit.tokens.families",))


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
        if implementation is not None and implementation not in READABLE_IMPLEMENTATIONS:
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


def find_family(model: nn.Module) -> TokenFamily:
    """The family ``model`` belongs to; a family that recognises the model but cannot reduce it says why when
    it is checked (``check``), not here."""
    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        if family.matches(model):
            return family(model)
    supported = "; ".join(FAMILIES.get(name).description for name in FAMILIES.names())
    raise PrunekitError(f"token reduction does not support {type(model).__name__}; supported: {supported}")

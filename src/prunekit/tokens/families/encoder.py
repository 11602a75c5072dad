"""Hugging Face encoders: text encoders (BERT, RoBERTa, DistilBERT, ELECTRA, ...; e.g. all-MiniLM-L6-v2) and
vision transformers (ViT), any whose blocks the model adapter finds and whose attention it can read.

The padding mask given to the model is honoured: padding is never kept in place of a real token, and each
sequence loses its share of its own real tokens. The first real token ([CLS]) is protected, and in text
(``input_ids`` given) the last real token too ([SEP]); pass ``protect_ids`` for other special tokens. After
a reduction the later blocks get an additive mask over the kept tokens (padding masked out, plus log(size)
under ToMe's proportional attention).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.block_call import CACHES, BlockCall
from prunekit.tokens.families.base import FAMILIES
from prunekit.tokens.families.hf import BlockReduction, HFFamily, argument

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch


@FAMILIES.register("encoder")
class Encoder(HFFamily):
    name: ClassVar[str] = "encoder"
    description: ClassVar[str] = ("Hugging Face encoders: text (BERT, RoBERTa, DistilBERT, ELECTRA, ...) and vision "
                                  "(ViT), found by structure")
    causal: ClassVar[bool] = False
    protect_last: ClassVar[int] = 1

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._tokens = 0  # tokens the blocks were given in the current pass (before any reduction)

    def protected(self, valid: torch.Tensor, input_ids: torch.Tensor | None,
                  protect_ids: Sequence[int]) -> torch.Tensor:
        """The first real token ([CLS]); in text also the last real token ([SEP]) and ``protect_ids``."""
        from_start = torch.cumsum(valid.long(), dim=1) - 1
        protected = from_start < 1
        if input_ids is not None:
            from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [1]), dim=1), [1]) - 1
            protected |= from_end < 1
            if protect_ids:
                ids = torch.tensor(list(protect_ids), device=input_ids.device)
                protected |= torch.isin(input_ids, ids).to(valid.device)
        return protected & valid

    def protection_rule(self, protect_ids: Sequence[int] = ()) -> str:
        rule = "the first real token ([CLS]), the last real token"
        if protect_ids:
            rule += f", token ids {sorted(set(protect_ids))}"
        return rule + " (all but the first in text only); padding is never kept in place of a real token"

    def begin_pass(self, patch: "TokenPatch", module: nn.Module, arguments: dict[str, Any]) -> None:
        if argument(arguments, *CACHES) is not None:
            raise PrunekitError("token reduction in an encoder does not take a key/value cache")
        mask = argument(arguments, "attention_mask")
        if mask is not None and mask.dim() != 2:
            raise PrunekitError(f"token reduction needs a 2-D padding mask (batch, tokens); got {mask.dim()}-D")
        patch.start(valid=mask, input_ids=argument(arguments, "input_ids"))

    def block_forward(self, patch: "TokenPatch", index: int, reduction: BlockReduction | None):
        family = self

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            signature = inspect.signature(original)

            def forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
                hidden = BlockCall.hidden_of(signature, args, kwargs)
                state = patch.state_for(hidden)
                if index == 0:
                    family._tokens = hidden.shape[1]
                # a reducing block that removes nothing (ratio 0, or too few tokens left) runs as any other
                remove = patch.removal(index, state) if reduction is not None else None
                if not state.reduced and remove is None:
                    return original(*args, **kwargs)
                call = BlockCall.bind(signature, args, kwargs)
                if state.reduced:
                    call = call.follow_tokens(hidden, state.source, family._tokens)
                    call = call.with_mask(state.key_bias(hidden.dtype))
                if remove is None:
                    return call.run(original)
                return reduction.run(patch, block, original, call, state, remove)

            return forward

        return make

"""Hugging Face models, recognised through the model adapter, and a reducing block's forward.

Nothing here names an architecture. The adapter finds the blocks and each block's attention;
``prunekit.models.attention`` reads the queries and keys the attention kernel received (after whatever
rotary embedding, partial rotary or q/k norm the family applies) and ``prunekit.models.block_call`` splits a
block around its attention where that split reproduces the block exactly. A reducing block removes tokens
after its attention and before its MLP when it splits, and after the whole block otherwise; the kept
tokens' hidden states are the same either way (an MLP works token by token), only the MLP's work on the
removed tokens is not saved.
"""

from __future__ import annotations

import inspect
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.models.attention import (attention_problem, attention_reader, block_attention, is_causal,
                                       shared_blocks)
from prunekit.models.block_call import BlockCall, candidate_halves, gather_mask, mlp_of, verified_halves
from prunekit.tokens.attention import AttentionView
from prunekit.tokens.families.base import TokenFamily

if TYPE_CHECKING:
    from prunekit.tokens.patch import TokenPatch
    from prunekit.tokens.state import TokenState

# Tokens of the first sequence a candidate split of a block is checked on (see ``verified_halves``).
PROBE_TOKENS = 8


def argument(arguments: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` given (not None) among bound arguments, or in their ``**kwargs``."""
    extra = arguments.get("kwargs")
    for name in names:
        if arguments.get(name) is not None:
            return arguments[name]
        if isinstance(extra, dict) and extra.get(name) is not None:
            return extra[name]
    return None


class HFFamily(TokenFamily):
    """A Hugging Face model whose blocks the adapter finds; ``causal`` tells encoders from decoders."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.adapter = adapter_for(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if getattr(model, "config", None) is None or not hasattr(model, "base_model"):
            return False  # not a transformers model (its PreTrainedModel has both)
        try:
            adapter = adapter_for(model)
        except PrunekitError:
            return False
        return is_causal(adapter) == cls.causal

    def layers(self) -> list[nn.Module]:
        return list(self.adapter.blocks())

    def model_name(self) -> str:
        return type(self.model).__name__

    @cached_property
    def model_problem(self) -> str | None:
        """Why token reduction cannot run in this model at all (one line), or None.

        Every block must be an attention block prunekit can read: the later blocks take the kept tokens with
        their positions and mask, which a convolution or state-space layer's state, ALiBi biases computed
        inside the attention or relative-position scores cannot follow.
        """
        config = getattr(self.model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder models are not supported (their decoder cross-attends to the encoder's tokens)"
        shared = shared_blocks(self.adapter)
        if shared is not None:
            return shared
        for index in range(self.depth):
            problem = attention_problem(self.adapter, index)
            if problem is not None:
                return problem
        return self.after_blocks_problem()

    def after_blocks_problem(self) -> str | None:
        """Why the model's own code after its blocks cannot take fewer tokens than it was given, or None."""
        return None

    def check(self, method) -> None:
        super().check(method)
        if self.model_problem is not None:
            raise PrunekitError(f"token reduction cannot run in {self.model_name()}: {self.model_problem}")

    def install(self, patch: "TokenPatch") -> None:
        if self.model_problem is not None:
            raise PrunekitError(f"token reduction cannot run in {self.model_name()}: {self.model_problem}")
        self.install_hooks(patch)
        for index, block in enumerate(self.layers()):
            reduction = BlockReduction(self, index) if patch.reduces_at(index) else None
            patch.replace_forward(block, self.block_forward(patch, index, reduction))

    def install_hooks(self, patch: "TokenPatch") -> None:
        """Start every forward pass with its arguments, bound where the pass enters the model: at the outermost
        module on the path from the model to its blocks that runs (a user may call the backbone directly, and
        OPT's language model calls its inner decoder, not its backbone)."""
        path = self.adapter.blocks_path.split(".")[:-1]
        ancestors = [self.model] + [self.model.get_submodule(".".join(path[:depth]))
                                    for depth in range(1, len(path) + 1)]
        entered: list[nn.Module] = []
        signatures = {id(module): inspect.signature(module.forward) for module in ancestors}

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if entered:
                return
            self.begin_pass(patch, module, signatures[id(module)].bind_partial(*args, **kwargs).arguments)
            entered.append(module)

        def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if entered and entered[0] is module:
                entered.clear()

        for module in dict.fromkeys(ancestors):
            patch.add_handle(module.register_forward_pre_hook(enter, with_kwargs=True))
            patch.add_handle(module.register_forward_hook(leave, with_kwargs=True, always_call=True))

    def begin_pass(self, patch: "TokenPatch", module: nn.Module, arguments: dict[str, Any]) -> None:
        """A forward pass enters the model at ``module`` with ``arguments``."""
        raise NotImplementedError

    def block_forward(self, patch: "TokenPatch", index: int, reduction: "BlockReduction | None"):
        raise NotImplementedError


class BlockReduction:
    """How one reducing block removes tokens: its attention read while it runs, the block split around it."""

    def __init__(self, family: HFFamily, index: int):
        adapter = family.adapter
        self.family = family
        self.index = index
        self.reader = attention_reader(adapter, index)
        block = adapter.blocks()[index]
        attention, _ = block_attention(adapter, index)
        parts = adapter.block_parts(index)
        named_mlp = None
        if parts.mlp is not None and parts.mlp.module:
            named_mlp = block.get_submodule(parts.mlp.module)
        elif parts.experts and parts.experts[0].container:
            named_mlp = block.get_submodule(parts.experts[0].container)
        self.candidates = candidate_halves(block, attention, mlp_of(block, attention, named_mlp))
        self._heads_checked = False

    def _probe(self, call: BlockCall, state: "TokenState") -> BlockCall:
        """A few real tokens of the first sequence, with their positions and mask."""
        tokens = state.valid[0].nonzero()[:PROBE_TOKENS, 0]
        first = call.first_row()
        source = tokens[None]
        probe = first.follow_tokens(first.hidden[:, tokens], source, call.hidden.shape[1])
        mask = first.mask
        return probe.with_mask(gather_mask(mask, source) if mask is not None else None)

    def _check_heads(self, view: AttentionView) -> None:
        """The kernel call read must be this block's attention: its head counts agree with the projections."""
        if self._heads_checked:
            return
        self._heads_checked = True
        try:
            layout = self.family.adapter.attention_layout(self.index)
        except PrunekitError:
            layout = None
        if layout is None:
            return
        heads, head_dim = view.query.shape[1], view.query.shape[-1]
        if (heads, view.key.shape[1], head_dim) != (layout.num_heads, layout.num_kv_heads, layout.head_dim):
            raise PrunekitError(f"block {self.index}'s attention kernel got {heads} query and {view.key.shape[1]} key "
                                f"heads of {head_dim}, not the {layout.num_heads} and {layout.num_kv_heads} of "
                                f"{layout.head_dim} its projections make; prunekit cannot tell what it read")

    def run(self, patch: "TokenPatch", block: nn.Module, forward, call: BlockCall, state: "TokenState",
            remove: torch.Tensor) -> Any:
        """Run the block, reading its attention, and remove ``remove`` tokens per sequence (``patch.removal``)."""
        halves = None
        if not block.training:  # dropout would make the check fail, and the split would skip it
            halves = verified_halves(block, forward, lambda: self._probe(call, state), self.candidates)
        with self.reader.reading() as calls:
            if halves is not None:
                hidden = halves.attention_half(call.hidden, call.arguments)
            else:
                output = call.run(forward)
        view = AttentionView.from_kernel(self.reader.single_call(calls), state, self.family.causal)
        self._check_heads(view)
        if halves is not None:
            return halves.mlp_half(patch.reduce(self.index, hidden, view, remove))
        if isinstance(output, torch.Tensor):
            return patch.reduce(self.index, output, view, remove)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
                and all(not isinstance(part, torch.Tensor) for part in output[1:]):
            return (patch.reduce(self.index, output[0], view, remove), *output[1:])
        raise PrunekitError(f"block {self.index} returns {type(output).__name__}, not the hidden states prunekit "
                            "can remove tokens from")

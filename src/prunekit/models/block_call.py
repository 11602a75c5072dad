"""One call of a model's block: its arguments by name, the ones that hold a value per token, and the block run
in two halves around its attention.

Whatever removes tokens between blocks (token reduction) must hand the later blocks arguments that follow
the kept tokens: rotary tables, position ids, the attention mask. The block's forward signature names them;
the names transformers uses for per-token arguments are listed here, and an unknown argument that holds a
value per token is refused rather than passed on misaligned.

Reducing *inside* a block (after its attention, before its MLP, where ToMe and FastV remove tokens) needs
the block's forward in two halves. Structure suggests the halves (pre-norm, post-norm, an attention that adds
its own residual), but only the block's code says how they combine (parallel residuals, extra norms,
residual multipliers). So a candidate split is used only after it reproduced the block's own forward bit for
bit on the first input the block sees; otherwise the block runs whole and tokens are removed after it.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError

MASK = "attention_mask"
# What the key/value cache is called in a block's arguments: ``cache`` (transformers 5.x; ``past_key_values``
# is still accepted with a deprecation warning), ``layer_past`` (GPT-NeoX, Falcon, GPT-BigCode).
CACHES = ("cache", "past_key_values", "layer_past")
# Arguments with one entry per token, by where their token axis is.
TOKENS_LAST = ("position_ids",)  # (batch|1, tokens), or (sections, batch, tokens) for multimodal rotary
TOKENS_SECOND = ("position_embeddings",)  # rotary tables: a (cos, sin) pair of (batch|1, tokens, dim)
SLOTS = ("cache_position",)  # cache slots the new tokens are written to: the first ones stay in use


@dataclass
class BlockCall:
    """A block's hidden states and its other arguments by name, as its forward binds them."""

    hidden: torch.Tensor
    arguments: dict[str, Any]

    @classmethod
    def bind(cls, signature: inspect.Signature, args: tuple, kwargs: dict) -> "BlockCall":
        bound = signature.bind(*args, **kwargs)
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise PrunekitError("a block received extra positional arguments prunekit cannot name")
            else:
                arguments[name] = value
        names = list(arguments)
        if not names or not isinstance(arguments[names[0]], torch.Tensor):
            raise PrunekitError("a block's first argument is not its hidden states")
        hidden = arguments.pop(names[0])
        return cls(hidden, arguments)

    def first_row(self) -> "BlockCall":
        """The call for the first sequence of the batch alone."""
        batch = self.hidden.shape[0]
        arguments = dict(self.arguments)
        for name, value in self.arguments.items():
            if name == MASK and isinstance(value, torch.Tensor) and value.shape[0] == batch:
                arguments[name] = value[:1]
            elif name in TOKENS_SECOND and isinstance(value, (tuple, list)):
                arguments[name] = type(value)(part[:1] if part.shape[0] == batch else part for part in value)
            elif name in TOKENS_LAST and isinstance(value, torch.Tensor) and value.dim() >= 2 \
                    and value.shape[-2] == batch:
                arguments[name] = value[..., :1, :]
        return BlockCall(self.hidden[:1], arguments)

    @staticmethod
    def hidden_of(signature: inspect.Signature, args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden states of a call, without binding the rest (the common case costs nothing more)."""
        return args[0] if args else kwargs[next(iter(signature.parameters))]

    def run(self, forward: Callable[..., Any]) -> Any:
        return forward(self.hidden, **self.arguments)

    @property
    def mask(self) -> torch.Tensor | None:
        return self.arguments.get(MASK)

    def with_mask(self, mask: torch.Tensor | None) -> "BlockCall":
        return replace(self, arguments={**self.arguments, MASK: mask})

    @property
    def cache(self) -> Any:
        return next((self.arguments[name] for name in CACHES if self.arguments.get(name) is not None), None)

    def without_cache(self) -> "BlockCall":
        arguments = {name: (None if name in CACHES else value) for name, value in self.arguments.items()}
        if "use_cache" in arguments:
            arguments["use_cache"] = False
        return replace(self, arguments=arguments)

    def follow_tokens(self, hidden: torch.Tensor, source: torch.Tensor, tokens: int) -> "BlockCall":
        """The call for ``hidden``, whose tokens are those at ``source`` (batch, kept) of the ``tokens`` the block
        was given (entries < 0 are padding and take any position): positions, rotary tables and cache slots
        follow them. The mask is left to the caller (``gather_mask``), who knows which tokens are padding."""
        kept = source.shape[1]
        index = source.clamp_min(0)
        arguments = dict(self.arguments)
        for name, value in self.arguments.items():
            if value is None or name == MASK or name in CACHES:
                continue
            if name in TOKENS_SECOND and isinstance(value, (tuple, list)):
                arguments[name] = type(value)(_gather(part, index, 1) for part in value)
            elif name in TOKENS_LAST and isinstance(value, torch.Tensor):
                arguments[name] = _gather(value, index, value.dim() - 1)
            elif name in SLOTS:
                arguments[name] = value[..., :kept]
            elif _holds_tokens(value, tokens):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise PrunekitError(f"the block argument '{name}' ({shape}) holds a value per token, which prunekit "
                                    "does not know how to follow when tokens are removed")
        return BlockCall(hidden, arguments)


def _holds_tokens(value: Any, tokens: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() >= 2 and tokens in tuple(value.shape[1:])
    if isinstance(value, (tuple, list)):
        return any(_holds_tokens(part, tokens) for part in value)
    if isinstance(value, dict):
        return any(_holds_tokens(part, tokens) for part in value.values())
    return False


def _gather(tensor: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """Entries of ``tensor`` at ``index`` (batch, kept) along its token ``axis``; a leading batch of 1 (shared by
    every sequence) is widened to the batch, and a sections axis before the batch is kept."""
    batch_axis = axis - 1
    shape = list(tensor.shape)
    shape[batch_axis] = index.shape[0]
    expanded = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_axis], view[axis] = index.shape
    target = list(expanded.shape)
    target[axis] = index.shape[1]
    return expanded.gather(axis, index.view(view).expand(target))


def gather_mask(mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A (batch|1, heads|1, queries|1, keys) mask restricted to the tokens at ``source`` (batch, kept), for queries
    and keys alike; entries < 0 take position 0 (their rows and columns are the caller's to mask)."""
    index = source.clamp_min(0)
    batch, kept = index.shape
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    if mask.shape[2] > 1:
        mask = mask.gather(2, index.view(batch, 1, kept, 1).expand(batch, heads, kept, mask.shape[3]))
    return mask.gather(3, index.view(batch, 1, 1, kept).expand(batch, heads, mask.shape[2], kept))


# ----- the block in two halves ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockHalves:
    """``attention_half`` returns the residual stream after the attention; ``mlp_half`` finishes the block."""

    shape: str
    attention_half: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    mlp_half: Callable[[torch.Tensor], torch.Tensor]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def _calling(attention: nn.Module) -> Callable[[torch.Tensor, dict[str, Any]], Any]:
    """Call ``attention`` with the block's arguments it takes: all of them when its forward takes ``**kwargs``."""
    parameters = inspect.signature(attention.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def call(hidden: torch.Tensor, arguments: dict[str, Any]) -> Any:
        chosen = {name: value for name, value in arguments.items()
                  if name in parameters or (takes_any and value is not None)}
        return attention(hidden, **chosen)

    return call


def candidate_halves(block: nn.Module, attention: nn.Module, mlp: nn.Module | None) -> list[BlockHalves]:
    """Splits of ``block`` its structure suggests, each still to be verified against its forward."""
    children = dict(block.named_children())
    call = _calling(attention)
    found: list[BlockHalves] = []
    norms = [child for child in children.values() if _is_norm(child)]
    direct = any(child is attention for child in children.values())
    if mlp is not None and direct and any(child is mlp for child in children.values()) and len(norms) == 2:
        first, second = norms
        found.append(BlockHalves(  # Llama, Mistral, Qwen, ViT, ...
            "pre-norm",
            lambda hidden, arguments: hidden + _first(call(first(hidden), arguments)),
            lambda hidden: hidden + _first(mlp(second(hidden)))))
        found.append(BlockHalves(  # DistilBERT: each residual sum normalised
            "post-norm",
            lambda hidden, arguments: first(hidden + _first(call(hidden, arguments))),
            lambda hidden: second(hidden + _first(mlp(hidden)))))
        found.append(BlockHalves(  # OLMo 2, EXAONE 4: the sub-layers' outputs normalised
            "norm-on-output",
            lambda hidden, arguments: hidden + first(_first(call(hidden, arguments))),
            lambda hidden: hidden + second(_first(mlp(hidden)))))
    if mlp is not None and direct and any(child is mlp for child in children.values()) and len(norms) == 4:
        before_attention, after_attention, before_mlp, after_mlp = norms
        found.append(BlockHalves(  # Gemma 2 and 3, GLM-4: a norm before and after each sub-layer
            "sandwich",
            lambda hidden, arguments: hidden + after_attention(_first(call(before_attention(hidden), arguments))),
            lambda hidden: hidden + after_mlp(_first(mlp(before_mlp(hidden))))))
    feed_forward = getattr(block, "feed_forward_chunk", None)
    if direct and callable(feed_forward):
        # BERT-style: the attention module ends with its own residual and norm; the block finishes with its
        # feed-forward chunk (intermediate and output, which adds the residual).
        found.append(BlockHalves("attention-with-residual", lambda hidden, arguments: _first(call(hidden, arguments)),
                                 feed_forward))
    return found


def mlp_of(block: nn.Module, attention: nn.Module, named: nn.Module | None) -> nn.Module | None:
    """The block's MLP (or mixture of experts) as a direct child: the adapter's where it names one, else the one
    child holding parameters that is neither the attention nor a norm."""
    children = list(block.children())
    if named is not None and any(child is named for child in children):
        return named
    rest = [child for child in children if child is not attention and not _is_norm(child)
            and any(True for _ in child.parameters())]
    return rest[0] if len(rest) == 1 else None


_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, BlockHalves | None]" = weakref.WeakKeyDictionary()


def verified_halves(block: nn.Module, forward: Callable[..., Any], probe: Callable[[], BlockCall],
                    candidates: list[BlockHalves]) -> BlockHalves | None:
    """The first candidate whose two halves give exactly what ``forward`` gives on ``probe()`` (a few tokens of
    the block's real input; run without a cache), remembered per block; None when no candidate does."""
    if block in _VERIFIED:
        return _VERIFIED[block]
    chosen = None
    if candidates:
        probe = probe().without_cache()
        with torch.no_grad():
            expected = _first(probe.run(forward))
            for halves in candidates:
                try:
                    got = halves.mlp_half(halves.attention_half(probe.hidden, probe.arguments))
                except Exception:  # a split that does not fit this block's code is simply not it
                    continue
                if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected):
                    chosen = halves
                    break
    _VERIFIED[block] = chosen
    return chosen

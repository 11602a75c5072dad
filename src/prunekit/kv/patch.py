"""``apply``: compress a Hugging Face decoder's key/value cache after the prompt, and the handle that undoes it.

Each block's attention runs exactly as the model runs it; at the prompt (the first pass into an empty cache)
its kernel's inputs are recorded (``prunekit.models.attention``: the queries and keys after rotary embedding,
the logit scale), the method scores the cached entries, and the block's cache layer keeps only the selected
ones. Nothing of a family's attention code is copied: the attention modules come from the model adapter and
the cache is transformers' own ``DynamicCache``.

After compression the cache holds fewer entries than the prompt had tokens, so the model can no longer infer
the next position from the cache's length: the patch gives every later pass the position ids that follow the
prompt when the caller gives none (``generate`` gives its own, which agree). Heads that keep different counts
(the ``adaptive`` allocation) hold padding, masked out of every later attention of that block; blocks that keep
different counts (``pyramid``) get a mask of their own length.

Sliding-window layers between full-attention ones (Gemma 2/3, gpt-oss) stay whole: their window bounds them
already, and they crop by count, which a compressed layer would turn into a span of more positions than the
window. A model whose layers are all sliding-window is refused.

Padded batches are refused: a row's padding would claim a share of its kept entries.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from prunekit.core.patching import ReversiblePatch
from prunekit.errors import PrunekitError
from prunekit.kv.base import KVMethod, PrefillView, get_method, kept_count
from prunekit.kv.budget import ALLOCATIONS, Selection, layer_budgets, select
from prunekit.kv.sparsity import magnitude_prune

CACHE_NAMES = ("cache", "past_key_values", "layer_past")  # layer_past: GPT-NeoX, Falcon, GPTBigCode
READABLE = ("eager", "sdpa")


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[inspect.BoundArguments, dict]:
    """The call's bound arguments and every argument by name (``**kwargs`` flattened)."""
    bound = signature.bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return bound, named


def _cache_of(named: Mapping[str, Any]) -> Any:
    for name in CACHE_NAMES:
        if named.get(name) is not None:
            return named[name]
    return None


def check_implementation(model: nn.Module) -> None:
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, *READABLE):
        raise PrunekitError(f"kv compression reads the attention through the eager or sdpa kernels; the model uses "
                            f"{implementation}: load it with attn_implementation='sdpa'")


def _is_sliding(layer: Any) -> bool:
    return bool(getattr(layer, "is_sliding", False)) or "SlidingWindow" in type(layer).__name__


def _check_layer(layer: Any) -> None:
    from transformers.cache_utils import DynamicLayer

    if type(layer) is not DynamicLayer:
        if _is_sliding(layer):
            # Its entries are cropped by count, not by position: after a compression the window would span more
            # than the model's sliding_window positions, so the model would attend where it never did.
            raise PrunekitError("kv compression shrinks full-attention cache layers; this model keeps a sliding-window "
                                f"cache layer ({type(layer).__name__}, its config's sliding_window), which prunekit "
                                "does not compress")
        raise PrunekitError(f"kv compression shrinks DynamicCache layers (the default cache); this cache layer is a "
                            f"{type(layer).__name__}: leave the cache out or pass a DynamicCache")


class FutureRotation:
    """Rotates queries recorded at their own positions to the average rotation of the positions after the prompt,
    with the model's own rotary embedding (its tables and its ``apply_rotary_pos_emb``): a query at position p is
    R(p)·q, so R(t)·q = R(t)·R(-p)·(R(p)·q), and the average over t is linear in cos and sin."""

    def __init__(self, model: nn.Module, attention: nn.Module):
        self.rotary = next((m for m in model.modules() if hasattr(m, "inv_freq") and "rotary" in
                            type(m).__name__.lower()), None)
        self.apply_rotary = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        self.name = type(attention).__name__

    def __call__(self, queries: torch.Tensor, positions: torch.Tensor, prompt: int, count: int) -> torch.Tensor:
        if self.rotary is None:
            return queries  # absolute positions: a query does not depend on where it will be asked
        if self.apply_rotary is None:
            raise PrunekitError(f"{self.name}'s module has no apply_rotary_pos_emb, so prunekit cannot move its "
                                "queries to future positions (expected_attention)")
        scaling = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        cos, sin = self.rotary(queries, -positions[None].to(queries.device))
        plain = self._rotate(queries, cos.float() / scaling, sin.float() / scaling)
        future = torch.arange(prompt, prompt + count, device=queries.device)[None]
        cos, sin = self.rotary(queries, future)
        return self._rotate(plain, cos.float().mean(dim=1, keepdim=True), sin.float().mean(dim=1, keepdim=True))

    def _rotate(self, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated, _ = self.apply_rotary(queries, queries, cos, sin)
        return rotated


@dataclass
class _Prompt:
    """The compressed prompt the cache holds: the cache itself (weakly), the tokens the model has seen through it,
    and, per block, which slots are real where heads keep different counts."""

    cache: Any = None  # weakref to the compressed cache
    seen: int = 0
    valid: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, key_heads, slots) bool
    # while decoding under a budget, per layer: each slot's original position, the latest queries and their
    # positions, the kernel's scale, and the steps since the last compression
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    recent: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scale: dict[int, float] = field(default_factory=dict)
    since: dict[int, int] = field(default_factory=dict)

    def holds(self, cache: Any) -> bool:
        return self.cache is not None and self.cache() is cache


@dataclass
class _Attention:
    index: int  # block index
    layer: int  # the cache layer it writes
    module: nn.Module
    reader: Any
    rotation: FutureRotation


@dataclass(frozen=True)
class DecodeBudget:
    """While decoding, every ``every`` new tokens a block whose cache holds more than ``entries`` entries per key
    head is compressed back to ``entries`` by the patch's method, scored with the latest queries."""

    entries: int
    every: int = 16


class KVPatch(ReversiblePatch):
    """A kv-cache compression patch on a model; ``remove()`` (or leaving a ``with`` block) undoes it exactly.

    After a prefill, ``kept_positions()`` gives each block's kept prompt positions per key head and
    ``selections`` the selections themselves."""

    marker = "_prunekit_kv_patch"

    def __init__(self, model: nn.Module, attentions: list[_Attention], method: KVMethod, allocation: str,
                 safeguard: float, seed: int, decode: DecodeBudget | None = None, zero_ratio: float = 0.0,
                 taper: float = 0.5):
        super().__init__(model)
        self.taper = taper
        self.attentions = attentions
        self.method = method
        self.allocation = allocation
        self.safeguard = safeguard
        self.seed = seed
        self.decode = decode
        self.zero_ratio = zero_ratio
        self.compressions = 0  # decode-time compressions so far (every block counted)
        self.selections: dict[int, Selection] = {}
        # block -> (keys, values, length) of a sliding-window layer the last prefill left whole
        self.windowed: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.prompt_tokens = 0
        self._prompt = _Prompt()
        self._prefilled: int | None = None  # attention layers that compressed the prompt in this prefill

    # ----- installing and removing (core.patching; the cache it compressed stays compressed) ----------
    def attach(self) -> None:
        for attention in self.attentions:
            self.replace_forward(attention.module, self._attention_forward(attention))
        self.add_handle(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self.add_handle(self.model.register_forward_hook(self._after_model))

    # ----- one forward pass of the model ----------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = _cache_of(kwargs)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if cache is None or cache.get_seq_length() == 0:
            check_implementation(self.model)
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2 and not bool(mask.bool().all()) and not self.idle:
                raise PrunekitError("kv compression takes prompts without padding: compress a padded batch one "
                                    "prompt at a time, or give prompts of equal length")
            self._prompt = _Prompt()
            self._prefilled = 0
            self.windowed = {}
            return None
        self._prefilled = None
        if not self._prompt.holds(cache) or inputs is None:
            return None
        queries = inputs.shape[1]
        if kwargs.get("position_ids") is None:
            positions = torch.arange(self._prompt.seen, self._prompt.seen + queries, device=inputs.device)
            kwargs = {**kwargs, "position_ids": positions.expand(inputs.shape[0], queries)}
        self._prompt.seen += queries
        return args, kwargs

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        # A prompt cached by the model but never seen by a patched attention would go on uncompressed, silently:
        # the attention takes the cache under a name prunekit does not know, or the model caches elsewhere.
        prefilled, self._prefilled = self._prefilled, None
        if prefilled != 0 or self.idle:
            return
        cache = _cache_of(output) if isinstance(output, Mapping) else None
        if cache is not None and cache.get_seq_length() > 0:
            raise PrunekitError(f"{type(self.model).__name__} cached the prompt, but none of its attention layers "
                                "received the cache where prunekit looks for it, so nothing would be compressed")

    def _attention_forward(self, attention: _Attention) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        patch = self

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            signature = inspect.signature(original)

            def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                bound, named = _arguments(signature, args, kwargs)
                cache = _cache_of(named)
                if cache is None or patch.idle:
                    return original(*args, **kwargs)
                layer = cache.layers[attention.layer] if attention.layer < len(cache.layers) else None
                if layer is None or layer.get_seq_length() == 0:
                    return patch._prefill(attention, cache, named, original, args, kwargs)
                if not patch._prompt.holds(cache):
                    return original(*args, **kwargs)
                return patch._later(module, attention, cache, bound, named, original)

            return forward

        return make

    def _prefill(self, attention: _Attention, cache: Any, named: dict, original: Callable[..., Any], args: tuple,
                 kwargs: dict) -> Any:
        hidden = next(iter(named.values()))
        tokens = hidden.shape[1]
        window = self.method.window()
        if tokens <= window:
            raise PrunekitError(f"{self.method.name} reads the prompt's last {window} tokens and needs a longer "
                                f"prompt; this one has {tokens}")
        check_implementation(self.model)
        with attention.reader.reading() as calls:
            output = original(*args, **kwargs)
        inputs = attention.reader.single_call(calls)
        layer = cache.layers[attention.layer]
        if _is_sliding(layer) and not all(_is_sliding(cache.layers[other.layer]) for other in self.attentions
                                          if other.layer < len(cache.layers)):
            # A sliding-window layer (Gemma 2/3, gpt-oss: between full-attention ones) is bounded by its window
            # already and crops by count, so it stays whole; the full-attention layers carry the compression.
            # kept as they were after the prompt (a window's worth at most), so rewind() can restore them
            self.windowed[attention.index] = (layer.keys, layer.values, layer.cumulative_length)
            return output
        _check_layer(layer)
        if self.method.ratio > 0:
            view = PrefillView(keys=layer.keys, values=layer.values, queries=inputs.query, scale=inputs.scaling,
                               layer=attention.layer, seed=self.seed,
                               future_rotation=lambda q, p, n: attention.rotation(q, p, tokens, n))
            if self.allocation == "pyramid":
                keep = self._pyramid_keep(attention, tokens)
                selection = select(self.method.score(view), 0.0, "uniform", protected=self.method.protected(tokens),
                                   keep=keep)
                # a block holding another count than the model's first one needs its own mask in later passes
                selection.valid = torch.ones_like(selection.positions, dtype=torch.bool)
            else:
                selection = select(self.method.score(view), self.method.ratio, self.allocation, self.safeguard,
                                   self.method.protected(tokens))
            kept = selection.positions.clamp_min(0)[..., None]
            # keys and values may differ in head size (multi-head latent attention: DeepSeek-V3)
            layer.keys = layer.keys.gather(2, kept.expand(-1, -1, -1, layer.keys.shape[-1])).contiguous()
            layer.values = layer.values.gather(2, kept.expand(-1, -1, -1, layer.values.shape[-1])).contiguous()
        else:
            selection = Selection(torch.arange(tokens, device=layer.keys.device).expand(*layer.keys.shape[:3]))
        if self.zero_ratio > 0:
            layer.keys, layer.values = magnitude_prune(layer.keys, self.zero_ratio), magnitude_prune(layer.values,
                                                                                                   self.zero_ratio)
        self.selections[attention.index] = selection
        self._prefilled = (self._prefilled or 0) + 1
        if attention.index == self.attentions[0].index or not self._prompt.holds(cache):
            self._prompt = _Prompt(cache=weakref.ref(cache), seen=tokens)
            self.prompt_tokens = tokens
        prompt = self._prompt
        if selection.valid is not None:
            prompt.valid[attention.layer] = selection.valid
        if self.decode is not None:
            recent = self.method.recent_queries()
            prompt.positions[attention.layer] = selection.positions
            prompt.recent[attention.layer] = (inputs.query[:, :, tokens - recent:],
                                              torch.arange(tokens - recent, tokens, device=layer.keys.device))
            prompt.scale[attention.layer] = inputs.scaling
            prompt.since[attention.layer] = 0
        return output

    def _pyramid_keep(self, attention: _Attention, tokens: int) -> int:
        budgets = layer_budgets(kept_count(tokens, self.method.ratio), tokens, len(self.attentions), self.taper)
        return budgets[self.attentions.index(attention)]

    @property
    def idle(self) -> bool:
        """Whether the patch changes nothing (ratio 0, no decoding budget, no zeroing): the model runs untouched."""
        return self.method.ratio == 0 and self.decode is None and self.zero_ratio == 0

    def _later(self, module: nn.Module, attention: _Attention, cache: Any, bound: inspect.BoundArguments,
               named: dict, original: Callable[..., Any]) -> Any:
        """A pass after the prompt through a block whose cache the patch holds."""
        if attention.index in self.windowed:
            return original(*bound.args, **bound.kwargs)
        queries = next(iter(named.values())).shape[1]
        valid = self._prompt.valid.get(attention.layer)
        if valid is not None:
            self._mask_padding(module, bound, valid, queries)
        recent = self.method.recent_queries() if self.decode is not None else 0
        if recent:
            with attention.reader.reading() as calls:
                output = original(*bound.args, **bound.kwargs)
            query = attention.reader.single_call(calls).query
        else:
            output = original(*bound.args, **bound.kwargs)
        layer = cache.layers[attention.layer]
        if self.zero_ratio > 0:
            layer.keys[..., -queries:, :] = magnitude_prune(layer.keys[..., -queries:, :], self.zero_ratio)
            layer.values[..., -queries:, :] = magnitude_prune(layer.values[..., -queries:, :], self.zero_ratio)
        if valid is not None:
            grown = torch.ones(*valid.shape[:2], queries, dtype=torch.bool, device=valid.device)
            self._prompt.valid[attention.layer] = torch.cat([valid, grown], dim=-1)
        if self.decode is not None:
            self._follow(attention, cache, queries, query if recent else None)
        return output

    def _follow(self, attention: _Attention, cache: Any, queries: int, query: torch.Tensor | None) -> None:
        """Note the new tokens' positions (and queries); compress the block back to the budget when due."""
        prompt, index = self._prompt, attention.layer
        start = prompt.seen - queries
        new = torch.arange(start, start + queries, device=cache.layers[index].keys.device)
        positions = prompt.positions[index]
        prompt.positions[index] = torch.cat([positions, new.expand(*positions.shape[:2], queries)], dim=-1)
        if query is not None:
            keep = self.method.recent_queries()
            old_query, old_positions = prompt.recent[index]
            prompt.recent[index] = (torch.cat([old_query, query], dim=2)[:, :, -keep:],
                                    torch.cat([old_positions, new])[-keep:])
        prompt.since[index] += queries
        layer = cache.layers[index]
        if prompt.since[index] < self.decode.every or layer.keys.shape[2] <= self.decode.entries:
            return
        recent_query, recent_positions = prompt.recent.get(index, (None, None))
        if recent_query is None:
            recent_query = layer.keys.new_zeros(layer.keys.shape[0], 0, 0, layer.keys.shape[-1])
            recent_positions = new[:0]
        seen = prompt.seen
        view = PrefillView(keys=layer.keys, values=layer.values, queries=recent_query, scale=prompt.scale[index],
                           layer=index, seed=self.seed,
                           future_rotation=lambda q, p, n: attention.rotation(q, p, seen, n),
                           query_positions=recent_positions, key_positions=prompt.positions[index])
        selection = select(self.method.score(view), 0.0, "uniform", protected=self.method.protected(layer.keys.shape[2]),
                           keep=self.decode.entries)
        slots = selection.positions
        index4 = slots[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index4).contiguous()
        layer.values = layer.values.gather(2, index4).contiguous()
        prompt.positions[index] = prompt.positions[index].gather(2, slots)
        prompt.since[index] = 0
        self.compressions += 1

    def _mask_padding(self, module: nn.Module, bound: inspect.BoundArguments, valid: torch.Tensor,
                      queries: int) -> None:
        """A later pass through a block whose heads hold padding: the cached part of the mask comes from which
        slots are real, the new tokens see each other causally."""
        hidden = next(iter(bound.arguments.values()))
        batch, key_heads, slots = valid.shape
        heads = getattr(module.config, "num_attention_heads", key_heads)
        cached = valid.repeat_interleave(heads // key_heads, dim=1)[:, :, None, :].expand(-1, -1, queries, -1)
        causal = torch.ones(queries, queries, dtype=torch.bool, device=valid.device).tril()
        allowed = torch.cat([cached, causal.expand(batch, heads, queries, queries)], dim=-1)
        if getattr(module.config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        else:
            mask = allowed
        if "attention_mask" not in bound.signature.parameters:
            raise PrunekitError(f"{type(module).__name__} takes no attention_mask, so the {self.allocation} allocation "
                                "cannot give its cache its own mask; use allocation='uniform'")
        bound.arguments["attention_mask"] = mask

    # ----- after a prefill -------------------------------------------------------------------------
    def rewind(self, cache: Any) -> None:
        """Drop what later passes appended to the compressed ``cache``, back to the prompt as compressed (to time
        or repeat decoding from the same prompt)."""
        if not self._prompt.holds(cache):
            raise PrunekitError("rewind() takes the cache this patch compressed last")
        if self.decode is not None:
            raise PrunekitError("rewind() cannot restore entries that a decoding budget removed")
        for attention in self.attentions:
            layer = cache.layers[attention.layer]
            if attention.index in self.windowed:
                layer.keys, layer.values, layer.cumulative_length = self.windowed[attention.index]
                continue
            selection = self.selections[attention.index]
            kept = selection.positions.shape[-1]
            layer.keys, layer.values = layer.keys[..., :kept, :], layer.values[..., :kept, :]
            if selection.valid is not None:
                self._prompt.valid[attention.layer] = selection.valid
        self._prompt.seen = self.prompt_tokens

    def cache_entries(self) -> int:
        """Real (unpadded) entries the last prefill kept, over every block, key head and sequence."""
        batch, heads = next(iter(self.selections.values())).positions.shape[:2] if self.selections else (0, 0)
        return (sum(selection.entries() for selection in self.selections.values())
                + batch * heads * sum(keys.shape[2] for keys, _, _ in self.windowed.values()))

    def kept_positions(self) -> dict[int, torch.Tensor]:
        """Block index -> (batch, key_heads, kept) prompt positions each key head kept (-1: padding slot)."""
        if not self.selections:
            raise PrunekitError("kept_positions() needs a prefill through the patched model first")
        return {index: selection.positions for index, selection in self.selections.items()}

    def describe(self) -> dict[str, Any]:
        return {"method": self.method.settings(), "allocation": self.allocation,
                "safeguard": self.safeguard if self.allocation == "adaptive" else None,
                "taper": self.taper if self.allocation == "pyramid" else None, "seed": self.seed,
                "decode_budget": None if self.decode is None else vars(self.decode), "zero_ratio": self.zero_ratio,
                "blocks": [attention.index for attention in self.attentions]}

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"KVPatch({self.method.name}, ratio={self.method.ratio:g}, allocation={self.allocation}, {status})"


def find_attentions(model: nn.Module) -> list[_Attention]:
    """Every block's attention (through the model adapter), refused in one line where it cannot be read."""
    from prunekit.models import adapter_for
    from prunekit.models.attention import attention_reader, block_attention, shared_blocks

    adapter = adapter_for(model)
    shared = shared_blocks(adapter)
    if shared is not None:
        raise PrunekitError(shared)
    found = []
    for index in range(len(adapter.blocks())):
        reader = attention_reader(adapter, index)
        module, _ = block_attention(adapter, index)
        layer = getattr(module, "layer_idx", None)
        found.append(_Attention(index, index if layer is None else int(layer), module, reader,
                                FutureRotation(model, module)))
    return found


def apply(model: nn.Module, method: "str | Mapping[str, Any] | KVMethod" = "snapkv", ratio: float | None = None, *,
          allocation: str = "uniform", safeguard: float = 0.2, seed: int = 0, decode_budget: int | None = None,
          decode_every: int = 16, zero_ratio: float = 0.0, taper: float = 0.5, **settings: Any) -> KVPatch:
    """Make ``model`` compress its key/value cache after each prompt; returns the handle that undoes it.

    ``ratio`` is the fraction of the prompt's cached entries removed in every block [default: the method's, 0.5].
    ``method`` is a name (``prunekit kv methods``), ``{"name": ..., **settings}`` or a built method; its settings
    (``window_size`` for SnapKV, ...) are keyword arguments. ``allocation`` spreads the budget over a block's key
    heads: ``uniform`` or ``adaptive`` (Ada-KV, each head keeping at least ``safeguard`` of its uniform share), or
    over the blocks: ``pyramid`` (PyramidKV, the first block keeping ``1 + taper`` times the uniform count per head,
    the last ``1 - taper`` times it, the total unchanged).
    ``decode_budget`` keeps the cache at that many entries per key head while generating: every ``decode_every``
    new tokens, a block holding more is compressed back by the same method (uniform allocation only).
    ``zero_ratio`` zeroes that fraction of every cached key and value vector, its smallest magnitudes (Mustafar's
    per-token unstructured sparsity): the tensors stay dense, so it saves no memory by itself;
    ``prunekit.kv.sparsity.sparse_bytes`` says what a bitmap format would hold.

    >>> with prunekit.kv.apply(model, "snapkv", ratio=0.5):
    ...     model.generate(input_ids, max_new_tokens=32)
    """
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"expected a torch model (nn.Module), got {type(model).__name__}")
    existing = KVPatch.installed_on(model)
    if existing is not None:
        raise PrunekitError(f"the model already carries a kv patch ({existing.method.name}); remove it first")
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if not 0.0 <= safeguard <= 1.0:
        raise PrunekitError(f"safeguard {safeguard:g} is outside [0, 1]: the share of its uniform budget a head keeps")
    if not 0.0 <= taper < 1.0:
        raise PrunekitError(f"taper {taper:g} is outside [0, 1): how far the pyramid's first and last blocks depart "
                            "from the uniform count")
    built = get_method(method, ratio, **settings)
    decode = None
    if decode_budget is not None:
        if allocation != "uniform":
            raise PrunekitError("a decoding budget keeps every head at the same count; use allocation='uniform'")
        floor = max(built.window(), built.recent_queries()) + 1
        if decode_budget < floor or decode_every < 1:
            raise PrunekitError(f"decode_budget must be at least {floor} entries for {built.name} (it keeps its last "
                                f"{floor - 1} tokens) and decode_every at least 1; got {decode_budget} and "
                                f"{decode_every}")
        decode = DecodeBudget(decode_budget, decode_every)
    if not 0.0 <= zero_ratio < 1.0:
        raise PrunekitError(f"zero_ratio {zero_ratio:g} is outside [0, 1): the fraction of each cached vector zeroed")
    check_implementation(model)
    return KVPatch(model, find_attentions(model), built, allocation, safeguard, seed, decode, zero_ratio,
                   taper).install()

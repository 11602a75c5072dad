"""The interface of a key/value-cache compression method, and what it may look at.

A method scores every cached entry of one block's prompt (per key head): higher keeps. The patch
(``prunekit.kv.patch``) captures what the block's attention kernel received, hands the method a
``PrefillView`` of it, turns the scores into a selection under the allocation (``prunekit.kv.budget``)
and shrinks the cache; a method never touches the model or the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from pydantic import Field, model_validator

from prunekit.core.method import Method
from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

METHODS: Registry[type["KVMethod"]] = Registry("kv method", ("prunekit.kv.methods",))


@dataclass
class PrefillView:
    """One block's prompt as its attention kernel saw it, computed further only as far as a method asks."""

    keys: torch.Tensor  # (batch, key_heads, entries, head_dim) as cached (after rotary embedding)
    values: torch.Tensor  # (batch, key_heads, entries, head_dim)
    queries: torch.Tensor  # (batch, heads, queries, head_dim) as the kernel got them: the prompt's, or while
    #                        decoding the last few (after rotary embedding)
    scale: float  # the kernel's logit scale
    layer: int
    seed: int
    # rotates queries taken at positions ``positions`` to the average rotation of the ``count`` positions after the
    # tokens seen so far (the identity for a model without rotary embeddings); see ``prunekit.kv.patch.FutureRotation``
    future_rotation: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    query_positions: torch.Tensor | None = None  # (queries,) [default: the entries' own, 0..entries-1]
    key_positions: torch.Tensor | None = None  # (batch, key_heads, entries) original positions [default: 0..entries-1]

    def __post_init__(self) -> None:
        device = self.keys.device
        if self.query_positions is None:
            self.query_positions = torch.arange(self.queries.shape[2], device=device)
        if self.key_positions is None:
            self.key_positions = torch.arange(self.tokens, device=device).expand(*self.keys.shape[:3])

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def window_attention(self, window: int) -> torch.Tensor:
        """(batch, heads, window, entries) float32: the attention of the last ``window`` queries over every cached
        entry, causal by the entries' original positions as the model computed it."""
        queries = self.queries[:, :, -window:].float()
        keys = self.keys.float()
        positions = self.key_positions
        if self.groups > 1:
            keys = keys.repeat_interleave(self.groups, dim=1)
            positions = positions.repeat_interleave(self.groups, dim=1)
        logits = (queries @ keys.transpose(-1, -2)) * self.scale
        future = positions[:, :, None, :] > self.query_positions[-window:].view(1, 1, -1, 1)
        return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)

    def per_key_head(self, scores: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens) -> (batch, key_heads, tokens): the mean over the query heads sharing a key head."""
        batch, heads, tokens = scores.shape
        return scores.view(batch, heads // self.groups, self.groups, tokens).mean(dim=2)


class KVMethod(Method):
    """A way of ranking the cached entries of a prompt. Subclasses are pydantic models: ``ratio`` and their own
    fields are the settings, validated when the method is built by name through ``METHODS.build``."""

    ratio: float = Field(0.5, description="fraction of the prompt's cached entries removed in every block")

    summary: ClassVar[str]
    deterministic: ClassVar[bool] = True  # the same inputs give the same selection (no seed involved)

    @model_validator(mode="after")
    def _check_ratio(self) -> "KVMethod":
        if not 0.0 <= self.ratio < 1.0:
            raise PrunekitError(f"ratio {self.ratio:g} is outside [0, 1): it is the fraction of the prompt's "
                                "cached entries removed")
        return self

    def window(self) -> int:
        """The prompt's last tokens the method reads as queries (and always keeps); 0 when none."""
        return 0

    def recent_queries(self) -> int:
        """While decoding: how many of the latest queries the method reads (kept as they come)."""
        return self.window()

    def protected(self, tokens: int) -> torch.Tensor | None:
        """Positions (long) every head keeps whatever their scores, or None."""
        return None

    def score(self, view: PrefillView) -> torch.Tensor:
        """(batch, key_heads, tokens): higher keeps."""
        raise NotImplementedError


def get_method(spec: "str | Mapping[str, Any] | KVMethod", ratio: float | None = None, **settings: Any) -> KVMethod:
    """A kv method from its name (or ``{"name": ..., **settings}``), every setting checked here."""
    if isinstance(spec, KVMethod):
        if ratio is not None or settings:
            raise PrunekitError("give settings either in the method object or as keyword arguments, not both")
        return spec
    if ratio is not None:
        settings["ratio"] = ratio
    return METHODS.build(spec, **settings)


def kept_count(tokens: int, ratio: float) -> int:
    """Entries a head keeps of ``tokens``: the fraction ``1 - ratio``, rounded down, at least one."""
    return max(1, int(tokens * (1.0 - ratio)))


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average each score with its neighbours (a window of ``kernel`` positions, zeros beyond the ends), so a
    kept entry brings its context along (SnapKV's clustering)."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    pooled = torch.nn.functional.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size=kernel, stride=1,
                                            padding=kernel // 2)
    return pooled.reshape(shape)

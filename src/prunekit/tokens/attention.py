"""A layer's attention, seen from the queries and keys it used, computed only as far as a method asks.

Methods read attention probabilities that the model's fast attention kernels never materialise.
Rather than forcing the slow eager implementation, the patch records what the layer's attention kernel
received (queries and keys after rotary embedding and norms, the mask, soft-capping and sink logits; see
``prunekit.models.attention``) and recomputes just what is needed: one row for EViT/FastV, the whole
matrix for Zero-TPrune and the attention-magnitude baseline, nothing for ToMe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prunekit.tokens.state import TokenState, additive_mask

if TYPE_CHECKING:
    from prunekit.models.attention import KernelInputs


class AttentionView:
    def __init__(self, query: torch.Tensor | None, key: torch.Tensor, scale: float, state: TokenState, causal: bool,
                 mask: torch.Tensor | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None):
        if query is not None and query.shape[1] % key.shape[1]:
            raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key heads")
        self.query = query  # (batch, heads, tokens, head_dim)
        self.key = key  # (batch, key_heads, tokens, head_dim)
        self.scale = scale
        self.state = state
        self.causal = causal
        self.mask = mask  # the mask the attention kernel got; None: the state's (padding, causal, proportional)
        self.softcap = softcap
        self.sinks = sinks
        self._probabilities: torch.Tensor | None = None

    @classmethod
    def from_kernel(cls, inputs: "KernelInputs", state: TokenState, causal: bool) -> "AttentionView":
        """The attention a kernel computed from what it received (see ``prunekit.models.attention``)."""
        return cls(inputs.query, inputs.key, inputs.scaling, state, causal, inputs.mask, inputs.softcap, inputs.sinks)

    @classmethod
    def from_probabilities(cls, probabilities: torch.Tensor, key: torch.Tensor, state: TokenState,
                           causal: bool = False) -> "AttentionView":
        """A view of given attention probabilities (batch, heads, tokens, tokens): for tests and for
        models that return their attention weights."""
        view = cls(None, key, 1.0, state, causal)
        view._probabilities = probabilities
        return view

    def _expanded_keys(self) -> torch.Tensor:
        groups = self.query.shape[1] // self.key.shape[1]
        return self.key.repeat_interleave(groups, dim=1) if groups > 1 else self.key

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(batch|1, heads|1, queries|1, keys) additive bias of the logits, as the kernel applied it."""
        if self.mask is not None:
            return additive_mask(self.mask, dtype)
        return self.state.causal_bias(dtype) if self.causal else self.state.key_bias(dtype)

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from biased logits; an attention sink takes its share of each row and is left out."""
        if self.sinks is None:
            return torch.softmax(logits, dim=-1)
        sinks = self.sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        return torch.softmax(torch.cat([logits, sinks], dim=-1), dim=-1)[..., :-1]

    def _logits(self, query: torch.Tensor) -> torch.Tensor:
        logits = (query.float() @ self._expanded_keys().float().transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def keys(self) -> torch.Tensor:
        """(batch, tokens, head_dim): keys averaged over heads, ToMe's similarity features."""
        return self.key.mean(dim=1)

    def anchor_attention(self, anchor: str) -> torch.Tensor:
        """(batch, tokens): the attention the anchor token (first or last) pays to every token,
        averaged over heads; padding receives zero."""
        index = self.state.anchor_index(anchor)
        if self._probabilities is not None:
            batch, heads, _, tokens = self._probabilities.shape
            rows = self._probabilities.gather(2, index.view(batch, 1, 1, 1).expand(batch, heads, 1, tokens))
            return rows.mean(dim=1)[:, 0] * self.state.valid
        batch, heads, _, dim = self.query.shape
        rows = self.query.gather(2, index.view(batch, 1, 1, 1).expand(batch, heads, 1, dim))
        logits = self._logits(rows)  # (batch, heads, 1, tokens)
        bias = self._bias(torch.float32)
        if bias is not None:
            if bias.shape[2] > 1:
                bias = bias.expand(batch, *bias.shape[1:])
                bias = bias.gather(2, index.view(batch, 1, 1, 1).expand(batch, bias.shape[1], 1, bias.shape[-1]))
            logits = logits + bias
        return self._softmax(logits).mean(dim=1)[:, 0] * self.state.valid

    def probabilities(self) -> torch.Tensor:
        """(batch, heads, tokens, tokens): every query's attention distribution over the keys."""
        if self._probabilities is None:
            logits = self._logits(self.query)
            bias = self._bias(torch.float32)
            if bias is not None:
                logits = logits + bias
            self._probabilities = self._softmax(logits)
        return self._probabilities

    def received(self) -> torch.Tensor:
        """(batch, tokens): attention each token receives, averaged over heads and over the real
        queries that can see it (under a causal mask, later tokens are seen by fewer queries)."""
        probabilities = self.probabilities().mean(dim=1)  # (batch, queries, keys)
        queries = self.state.valid.to(probabilities.dtype)
        total = (probabilities * queries[:, :, None]).sum(dim=1)
        if self.causal:
            # query i sees key j only if j <= i: count the real queries at or after each key.
            seen_by = torch.flip(torch.cumsum(torch.flip(queries, [1]), dim=1), [1])
        else:
            seen_by = queries.sum(dim=1, keepdim=True).expand_as(total)
        return total / seen_by.clamp_min(1.0) * self.state.valid

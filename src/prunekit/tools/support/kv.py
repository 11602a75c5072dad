"""KV-cache compression at prefill: TOVA end to end on an architecture, checked against an independent reference.

What a decoder must show: at ratio 0 the patched ``generate`` is bit for bit the unpatched one; at ratio 0.5
every attention layer's cache really holds half the prompt's entries per key head, and the continuation read
through the compressed cache equals the unpatched model continuing from a cache built by hand: the full cache's
keys and values gathered at the positions the patch reports as kept, the continuation given its true positions.
Removing the patch restores the unpatched outputs bit for bit.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.tools.support import ModelFactory, SupportResult, cache_keyword, one_line

PROMPT, CONTINUATION, NEW_TOKENS = 24, 4, 4
RATIO = 0.5


def _prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    return cache


def _gathered(full, kept: dict[int, torch.Tensor], layer_of: dict[int, int], config):
    """A cache holding, in every attention layer, the full cache's entries at the kept positions."""
    from transformers import DynamicCache

    reference = DynamicCache(config=config)
    by_layer = {layer_of[index]: positions for index, positions in kept.items()}
    for layer in range(len(full.layers)):
        keys, values = full.layers[layer].keys, full.layers[layer].values
        positions = by_layer.get(layer)
        if positions is not None:
            index = positions.clamp_min(0)[..., None].expand(-1, -1, -1, keys.shape[-1])
            keys = keys.gather(2, index)
            values = values.gather(2, positions.clamp_min(0)[..., None].expand(-1, -1, -1, values.shape[-1]))
        reference.update(keys, values, layer)
    return reference


def _generate(model, ids: torch.Tensor):
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=pad)


def check(factory: ModelFactory, windows: torch.Tensor) -> SupportResult:
    """``windows``: token ids, at least 2 × (PROMPT + CONTINUATION)."""
    import prunekit.kv as kv

    model = factory().eval()
    ids, continuation = windows[:2, :PROMPT], windows[:2, PROMPT:PROMPT + CONTINUATION]
    try:
        with torch.no_grad():
            dense = model(input_ids=ids).logits
            before = _generate(model, ids)
            with kv.apply(model, "tova", ratio=0.0):
                patched = _generate(model, ids)
            if not (torch.equal(before.sequences, patched.sequences)
                    and all(torch.equal(a, b) for a, b in zip(before.scores, patched.scores))):
                return SupportResult("broken", "at ratio 0 the patched generation differs from the unpatched one")
            with kv.apply(model, "tova", ratio=RATIO) as patch:
                cache = _prefill(model, ids)
                kept = {index: positions.clone() for index, positions in patch.kept_positions().items()}
                layer_of = {attention.index: attention.layer for attention in patch.attentions}
                held = {layer_of[index]: cache.layers[layer_of[index]].keys.shape[-2] for index in kept}
                logits = model(input_ids=continuation, use_cache=True, **{cache_keyword(model): cache}).logits
                generated = _generate(model, ids)
        expected = PROMPT - int(PROMPT * RATIO)
        short = {layer: count for layer, count in held.items() if count != expected}
        if short:
            layer, count = next(iter(short.items()))
            return SupportResult("broken", f"cache layer {layer} holds {count} entries per head, not {expected}")
        if not torch.isfinite(generated.sequences.float()).all() or generated.sequences.shape[1] != PROMPT + NEW_TOKENS:
            return SupportResult("broken", "generate() did not continue from the compressed cache")
        with torch.no_grad():
            reference_cache = _gathered(_prefill(model, ids), kept, layer_of, model.config)
            positions = torch.arange(PROMPT, PROMPT + CONTINUATION).expand(2, -1)
            reference = model(input_ids=continuation, position_ids=positions, use_cache=True,
                              **{cache_keyword(model): reference_cache}).logits
            after = model(input_ids=ids).logits
        if not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
            difference = float((logits - reference).abs().max())
            return SupportResult("broken", f"the continuation differs from the gathered full cache's by {difference:.2e}")
        if not torch.equal(after, dense):
            return SupportResult("broken", "removing the patch does not restore the unpatched outputs bit for bit")
    except PrunekitError as exc:
        return SupportResult("refused", one_line(exc))
    return SupportResult("yes", f"tova {RATIO:.0%}: {len(kept)} blocks keep {expected} of {PROMPT} prompt entries, "
                                "continuation checked")

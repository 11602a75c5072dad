"""Decode-time compression (a budget kept while generating) and unstructured K/V sparsity with honest bytes."""

import pytest
import torch
from transformers import DynamicCache

import prunekit.kv as kv
from prunekit.errors import PrunekitError
from prunekit.kv.sparsity import held_bytes, magnitude_prune, sparse_bytes
from tests.kv.test_kv_patch import PROMPT, _ids, _model, _prefill


def test_streaming_under_a_decoding_budget_generates_as_its_masked_full_attention():
    """Every step compresses back to sinks + the latest entries, so the query at position p sees the sinks, the
    budget's latest positions before it, and itself; a full forward with that mask must give the same logits."""
    model = _model()
    ids = _ids(batch=1)
    budget, sinks, steps = 12, 2, 6
    with kv.apply(model, "streaming_llm", ratio=0.0, sinks=sinks, decode_budget=budget, decode_every=1) as patch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        assert patch.compressions == 2 * (steps - 1)  # both blocks, after every decoding pass
    sequence = out.sequences[:, :-1]
    total = sequence.shape[1]
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    for position in range(PROMPT + 1, total):
        row = torch.zeros(total, dtype=torch.bool)
        row[:sinks] = True
        row[position - (budget - sinks):position + 1] = True
        allowed[position] = row
    with torch.no_grad():
        reference = model(sequence, attention_mask=allowed[None, None]).logits[:, PROMPT - 1:]
    torch.testing.assert_close(torch.stack(out.scores, dim=1), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options", [("snapkv", {"window_size": 4}), ("expected_attention", {}),
                                            ("tova", {}), ("knorm", {})])
def test_a_decoding_budget_bounds_the_cache(method, options):
    model = _model()
    ids = _ids(batch=2)
    budget, every = 70, 3
    lengths = []
    with kv.apply(model, method, ratio=0.5, decode_budget=budget, decode_every=every, **options) as patch:
        cache = _prefill(model, ids)
        token = ids[:, -1:]
        for _ in range(60):
            with torch.no_grad():
                token = model(token, cache=cache).logits[:, -1:].argmax(dim=-1)
            lengths.append(cache.layers[0].keys.shape[2])
        positions = patch._prompt.positions[0]
    assert max(lengths) <= budget + every - 1 and lengths[-1] >= budget
    assert bool((positions.diff(dim=-1) > 0).all())  # distinct original positions, in order
    if method != "knorm":  # a method with a window keeps the newest token (the 60th fed, at position 40 + 59)
        assert int(positions.max()) == PROMPT + 59


def test_decoding_budget_refusals():
    model = _model()
    with pytest.raises(PrunekitError, match="decode_budget must be at least 9 entries for snapkv"):
        kv.apply(model, "snapkv", window_size=8, decode_budget=8)
    with pytest.raises(PrunekitError, match="allocation='uniform'"):
        kv.apply(model, "knorm", allocation="adaptive", decode_budget=32)
    with pytest.raises(PrunekitError, match=r"zero_ratio 1 is outside \[0, 1\)"):
        kv.apply(model, "knorm", zero_ratio=1.0)


def test_magnitude_pruning_zeroes_the_smallest_entries_of_each_vector():
    vectors = torch.tensor([[[[3.0, -1.0, 0.5, -4.0], [0.1, 0.2, -0.3, 0.4]]]])
    pruned = magnitude_prune(vectors, 0.5)
    assert torch.equal(pruned, torch.tensor([[[[3.0, 0.0, 0.0, -4.0], [0.0, 0.0, -0.3, 0.4]]]]))


def test_sparse_kv_continues_as_the_hand_pruned_cache_and_its_bytes_are_counted_honestly():
    model = _model()
    ids, continuation = _ids(), _ids(tokens=4, seed=1)
    zero_ratio = 0.75
    with kv.apply(model, "knorm", ratio=0.5, zero_ratio=zero_ratio) as patch:
        cache = _prefill(model, ids)
        kept = {index: positions.clone() for index, positions in patch.kept_positions().items()}
        held, sparse = held_bytes(cache), sparse_bytes(cache)
        with torch.no_grad():
            logits = model(continuation, cache=cache).logits
    reference = _prefill(model, ids)
    for index, layer in enumerate(reference.layers):
        gather = kept[index][..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = magnitude_prune(layer.keys.gather(2, gather), zero_ratio)
        layer.values = magnitude_prune(layer.values.gather(2, gather), zero_ratio)
    per_tensor = 2 * 2 * 20 * 16  # batch × key heads × kept × head_dim
    tensors = 2 * 2  # blocks × (keys, values)
    assert held == held_bytes(reference) == tensors * per_tensor * 4  # dense float32: zeros save nothing
    assert sparse == tensors * (per_tensor // 8 + per_tensor // 4 * 4)  # a bitmap and a quarter of the values
    with torch.no_grad():
        positions = torch.arange(PROMPT, PROMPT + 4).expand(2, -1)
        expected = model(continuation, cache=reference, position_ids=positions).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

"""The kv patch on tiny random decoders: hand-computed selections, exact continuations, removal, batch
independence and every refused input."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import prunekit.kv as kv
from prunekit.errors import PrunekitError
from tests.conftest import tiny_llama
from tests.models.tiny_models import tiny_causal_lm

PROMPT, CONTINUATION, VOCAB = 40, 6, 1000


def _model(implementation="sdpa", **kwargs):
    model = tiny_llama(vocab=VOCAB, **kwargs)
    model.config._attn_implementation = implementation
    return model


def _ids(batch=2, tokens=PROMPT, seed=0):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


def _kept_by_layer(patch):
    return {index: positions.clone() for index, positions in patch.kept_positions().items()}


def test_snapkv_keeps_the_hand_computed_positions():
    model = _model("eager")
    ids = _ids()
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    window, kernel, ratio = 8, 3, 0.5
    with kv.apply(model, "snapkv", ratio=ratio, window_size=window, kernel_size=kernel) as patch:
        _prefill(model, ids)
        kept = _kept_by_layer(patch)
    keep = int(PROMPT * (1 - ratio))
    for layer, probabilities in enumerate(attentions):
        votes = probabilities[:, :, -window:, :-window].mean(dim=2)  # (batch, heads, prompt - window)
        votes = F.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2)
        votes = votes.view(2, 2, 2, -1).mean(dim=2)  # 4 query heads share 2 key heads
        best = votes.topk(keep - window, dim=-1).indices
        expected = torch.cat([best, torch.arange(PROMPT - window, PROMPT).expand(2, 2, window)], dim=-1)
        assert torch.equal(kept[layer], expected.sort(dim=-1).values)


def test_knorm_and_streaming_keep_the_hand_computed_positions():
    model = _model()
    ids = _ids()
    cache = _prefill(model, ids)
    with kv.apply(model, "knorm", ratio=0.75) as patch:
        _prefill(model, ids)
        kept = _kept_by_layer(patch)
    for layer in range(2):
        norms = cache.layers[layer].keys.norm(dim=-1)
        assert torch.equal(kept[layer], norms.topk(10, dim=-1, largest=False).indices.sort(dim=-1).values)
    with kv.apply(model, "streaming_llm", ratio=0.5, sinks=3) as patch:
        _prefill(model, ids)
        expected = torch.cat([torch.arange(3), torch.arange(PROMPT - 17, PROMPT)])
        assert all(torch.equal(p, expected.expand(2, 2, 20)) for p in patch.kept_positions().values())


def _masked_reference(model, ids, continuation, kept):
    """The continuation's logits from the full prompt cache, each block's attention masked per head to the kept
    prompt positions: what the compressed cache must reproduce."""
    cache = _prefill(model, ids)
    batch, queries, heads = ids.shape[0], continuation.shape[1], model.config.num_attention_heads
    handles = []
    for index, block in enumerate(model.model.layers):
        positions = kept[index]
        groups = heads // positions.shape[1]
        hits = F.one_hot(positions.clamp_min(0), PROMPT) * (positions >= 0)[..., None]
        allowed = hits.sum(dim=-2) > 0
        allowed = allowed.repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, queries, -1)
        mask = torch.cat([allowed, torch.ones(queries, queries, dtype=torch.bool).tril().expand(
            batch, heads, -1, -1)], dim=-1)

        def hook(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(block.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            positions = torch.arange(PROMPT, PROMPT + queries).expand(batch, -1)
            return model(continuation, cache=cache, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("method,allocation", [("streaming_llm", "uniform"), ("snapkv", "uniform"),
                                               ("expected_attention", "adaptive"), ("vatp", "adaptive")])
def test_the_compressed_cache_continues_as_the_masked_full_cache(method, allocation):
    model = _model()
    ids, continuation = _ids(), _ids(tokens=CONTINUATION, seed=1)
    options = {"window_size": 8} if method in ("snapkv", "vatp") else {}
    with kv.apply(model, method, ratio=0.6, allocation=allocation, **options) as patch:
        cache = _prefill(model, ids)
        with torch.no_grad():
            logits = model(continuation, cache=cache).logits  # no position ids: the patch supplies them
        kept = _kept_by_layer(patch)
    if allocation == "adaptive":
        assert any(bool((positions < 0).any()) for positions in kept.values())  # heads did keep different counts
    reference = _masked_reference(model, ids, continuation, kept)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_generate_decodes_from_the_compressed_cache():
    model = _model()
    ids = _ids()
    with kv.apply(model, "snapkv", ratio=0.5, window_size=8) as patch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        kept = _kept_by_layer(patch)
    generated = out.sequences[:, PROMPT:]
    # the scores of steps 2.. are the logits of the generated tokens fed back; step 1 is the prefill's last row
    reference = _masked_reference(model, ids, generated[:, :-1], kept)
    torch.testing.assert_close(torch.stack(out.scores[1:], dim=1), reference, rtol=1e-5, atol=1e-5)


def test_ratio_zero_is_bit_for_bit_the_unpatched_generation():
    model = _model()
    ids = _ids()
    settings = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    before = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    with kv.apply(model, "snapkv", ratio=0.0, window_size=8):
        patched = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    assert torch.equal(before.sequences, patched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.scores, patched.scores))


def test_the_patch_comes_off_exactly():
    model = _model()
    ids = _ids()
    attributes = {id(m): dict(vars(m)) for m in model.modules()}
    hooks = {id(m): (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()}
    patch = kv.apply(model, "tova", ratio=0.5)
    _prefill(model, ids)
    assert "forward" in vars(model.model.layers[0].self_attn)
    patch.remove()
    patch.remove()  # harmless
    for module in model.modules():
        assert dict(vars(module)) == attributes[id(module)]
        assert (dict(module._forward_pre_hooks), dict(module._forward_hooks)) == hooks[id(module)]
    fresh = _model()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("method", ["snapkv", "expected_attention", "random"])
def test_a_sequence_does_not_depend_on_its_batch(method):
    model = _model()
    ids, continuation = _ids(batch=3), _ids(batch=3, tokens=CONTINUATION, seed=1)
    options = {"window_size": 8} if method == "snapkv" else {}

    def run(rows):
        with kv.apply(model, method, ratio=0.5, **options) as patch:
            cache = _prefill(model, ids[rows])
            with torch.no_grad():
                logits = model(continuation[rows], cache=cache).logits
            return _kept_by_layer(patch), logits

    alone_kept, alone = run([1])
    batch_kept, batched = run([0, 1, 2])
    assert all(torch.equal(alone_kept[layer][0], batch_kept[layer][1]) for layer in alone_kept)
    torch.testing.assert_close(alone[0], batched[1], rtol=1e-5, atol=1e-5)


def test_adaptive_with_a_full_safeguard_is_uniform():
    model = _model()
    ids = _ids()
    selections = []
    for allocation in ("uniform", "adaptive"):
        with kv.apply(model, "knorm", ratio=0.5, allocation=allocation, safeguard=1.0) as patch:
            _prefill(model, ids)
            selections.append(_kept_by_layer(patch))
    assert all(torch.equal(selections[0][layer], selections[1][layer]) for layer in selections[0])


def test_adaptive_spends_the_uniform_budget():
    scores = torch.tensor([[[9.0, 8, 7, 6, 0, 0], [1.0, 1, 1, 1, 1, 5]]])
    selection = kv.select(scores, ratio=0.5, allocation="adaptive", safeguard=0.34)
    assert selection.entries() == 6  # two heads × three entries
    # each head first keeps its best (safeguard: 1 of 3); the other 4 go to the best scores left in either head
    assert selection.positions.tolist() == [[[0, 1, 2, 3], [0, 5, -1, -1]]]
    assert kv.select(scores, ratio=0.5).positions.tolist() == [[[0, 1, 2], [0, 1, 5]]]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_the_unit_interval_is_refused(ratio):
    with pytest.raises(PrunekitError, match=r"outside \[0, 1\)"):
        kv.apply(_model(), "knorm", ratio=ratio)


def test_bad_inputs_are_one_line_errors():
    model = _model()
    with pytest.raises(PrunekitError, match="needs a longer prompt; this one has 8"):
        with kv.apply(model, "snapkv", ratio=0.5, window_size=8):
            _prefill(model, _ids(tokens=8))
    with pytest.raises(PrunekitError, match="without padding"):
        with kv.apply(model, "knorm", ratio=0.5):
            mask = torch.ones(2, PROMPT, dtype=torch.long)
            mask[0, :3] = 0
            model(_ids(), attention_mask=mask)
    with pytest.raises(PrunekitError, match="allocation 'greedy'"):
        kv.apply(model, "knorm", allocation="greedy")
    with pytest.raises(PrunekitError, match="kernel_size"):
        kv.apply(model, "snapkv", kernel_size=4)
    with pytest.raises(PrunekitError, match="no kv method|unknown"):
        kv.apply(model, "h2o_typo")
    for implementation in ("flash_attention_2", "flex_attention"):
        model.config._attn_implementation = implementation
        with pytest.raises(PrunekitError, match=f"uses {implementation}"):
            kv.apply(model, "knorm")
    with pytest.raises(PrunekitError, match="computes its attention scores in its own code"):
        kv.apply(tiny_causal_lm("bloom"), "knorm")
    fine = _model()
    with kv.apply(fine, "knorm"):
        with pytest.raises(PrunekitError, match="already carries a kv patch"):
            kv.apply(fine, "knorm")


def test_static_caches_are_refused():
    from transformers import StaticCache

    model = _model()
    cache = StaticCache(config=model.config, max_cache_len=64)
    with kv.apply(model, "knorm", ratio=0.5), pytest.raises(PrunekitError, match="DynamicCache"):
        with torch.no_grad():
            model(_ids(), cache=cache)


def test_expected_attention_keeps_the_hand_computed_positions():
    """Statistics from the queries before rotary embedding (read at the q projection), rotated by the average
    rotation of the next positions as in the paper; the patch gets there from the rotated queries instead."""
    model = _model()
    ids = _ids()
    projected = {}
    handles = [block.self_attn.q_proj.register_forward_hook(
        lambda module, args, output, index=index: projected.__setitem__(index, output))
        for index, block in enumerate(model.model.layers)]
    cache = _prefill(model, ids)
    for handle in handles:
        handle.remove()
    sinks, future, ratio, head_dim = 4, 16, 0.5, 16
    with kv.apply(model, "expected_attention", ratio=ratio, sinks=sinks, future_positions=future) as patch:
        _prefill(model, ids)
        kept = _kept_by_layer(patch)
    cos, sin = model.model.rotary_emb(projected[0], torch.arange(PROMPT, PROMPT + future)[None])
    cos, sin = cos[0].mean(dim=0), sin[0].mean(dim=0)
    half = head_dim // 2
    rotation = torch.diag(cos)  # R·q = q·cos + rotate_half(q)·sin
    rotation[:half, half:] -= torch.diag(sin[:half])
    rotation[half:, :half] += torch.diag(sin[half:])
    for layer in range(2):
        queries = projected[layer].view(2, PROMPT, 4, head_dim).transpose(1, 2)[:, :, sinks:]
        mean = queries.mean(dim=2)
        centred = queries - queries.mean(dim=2, keepdim=True)
        covariance = torch.einsum("bhsi,bhsj->bhij", centred, centred) / centred.shape[2]
        mean, covariance = mean @ rotation.T, rotation @ covariance @ rotation.T
        keys = cache.layers[layer].keys[:, :, sinks:].repeat_interleave(2, dim=1)
        logits = torch.einsum("bhd,bhtd->bht", mean, keys) / head_dim ** 0.5
        logits += torch.einsum("bhti,bhij,bhtj->bht", keys, covariance, keys) / head_dim / 2
        scores = torch.softmax(logits, dim=-1).view(2, 2, 2, -1).mean(dim=2)
        scores = scores * cache.layers[layer].values[:, :, sinks:].norm(dim=-1)
        best = scores.topk(PROMPT // 2 - sinks, dim=-1).indices + sinks
        expected = torch.cat([torch.arange(sinks).expand(2, 2, sinks), best], dim=-1).sort(dim=-1).values
        assert torch.equal(kept[layer], expected)


def test_tova_keeps_the_last_tokens_attention_ranking_for_every_head():
    model = _model("eager")
    ids = _ids()
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    with kv.apply(model, "tova", ratio=0.5) as patch:
        _prefill(model, ids)
        kept = _kept_by_layer(patch)
    for layer, probabilities in enumerate(attentions):
        row = probabilities[:, :, -1, :-1].mean(dim=1)  # (batch, prompt - 1)
        best = row.topk(PROMPT // 2 - 1, dim=-1).indices
        expected = torch.cat([best, torch.full((2, 1), PROMPT - 1)], dim=-1).sort(dim=-1).values
        assert torch.equal(kept[layer], expected[:, None].expand(2, 2, -1))


def test_pyramid_budgets_fall_with_depth_and_keep_the_uniform_total():
    from prunekit.kv.budget import layer_budgets

    for keep, tokens, layers, taper in ((20, 40, 4, 0.5), (7, 9, 6, 0.9), (1, 40, 3, 0.5), (39, 40, 5, 0.5)):
        budgets = layer_budgets(keep, tokens, layers, taper)
        assert sum(budgets) == keep * layers
        assert all(1 <= b <= tokens for b in budgets)
        assert budgets == sorted(budgets, reverse=True)
    assert layer_budgets(20, 40, 3, 0.5) == [30, 20, 10]
    assert layer_budgets(20, 40, 4, 0.0) == [20] * 4


def test_pyramid_blocks_hold_their_own_counts_and_continue_as_the_masked_full_cache():
    model = _model(layers=3)
    ids, continuation = _ids(), _ids(tokens=CONTINUATION, seed=1)
    with kv.apply(model, "snapkv", ratio=0.5, allocation="pyramid", window_size=8) as patch:
        cache = _prefill(model, ids)
        assert [cache.layers[i].keys.shape[2] for i in range(3)] == [30, 20, 10]
        assert patch.cache_entries() == 2 * model.config.num_key_value_heads * 60
        with torch.no_grad():
            logits = model(continuation, cache=cache).logits
        kept = _kept_by_layer(patch)
    reference = _masked_reference(model, ids, continuation, kept)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)

"""Family plumbing checked against hand-written forward passes, and decoding on a pruned prefill."""

import pytest
import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError
from prunekit.tokens import apply

from tests.tokens.conftest import prunekit_vit, tiny_decoder


def test_vit_fastv_matches_a_hand_written_forward(images):
    """Block 1's [CLS] attention picks the tokens; they skip block 1's MLP onwards, nothing else changes."""
    model = prunekit_vit()
    ratio, layer = 0.5, 1
    with torch.no_grad():
        x = model.embed(images)
        x = model.blocks[0](x)
        block = model.blocks[layer]
        q, k, v = block.attn.split_heads(block.norm1(x))
        x = x + block.attn.merge_heads(F.scaled_dot_product_attention(q, k, v))
        cls_attention = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / block.attn.head_dim ** 0.5, -1).mean(1)[:, 0]
        keep_count = 49 - int(49 * ratio)
        chosen = cls_attention[:, 1:].topk(keep_count, dim=1).indices + 1
        index = torch.cat([torch.zeros(len(images), 1, dtype=torch.long), chosen.sort(dim=1).values], dim=1)
        x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        x = x + block.mlp(block.norm2(x))
        for later in model.blocks[layer + 1:]:
            x = later(x)
        expected = model.head(model.norm(x)[:, 0])
        with apply(model, "fastv", ratio=ratio, layers=[layer]) as patch:
            actual = model(images)
            assert patch.kept_positions().tolist() == index.tolist()
    assert torch.allclose(actual, expected, atol=1e-5)


def test_llama_prefill_pruning_matches_a_hand_written_forward():
    """FastV after block K: later blocks see only the kept tokens, at their original rotary positions."""
    model = tiny_decoder(layers=4)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    layer = 1
    with torch.no_grad(), apply(model, "fastv", ratio=0.5, layers=[layer]) as patch:
        actual = model(input_ids=ids).logits
        kept = patch.kept_positions()
    assert kept[:, 0].tolist() == [0, 0] and kept[:, -1].tolist() == [23, 23]
    assert kept.shape[1] == 2 + 22 - 11
    backbone = model.model
    with torch.no_grad():
        hidden = backbone.embed_tokens(ids)
        positions = torch.arange(24)[None]
        cos, sin = backbone.rotary_emb(hidden, positions)
        causal = torch.full((24, 24), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        for index, block in enumerate(backbone.layers):
            if index == layer + 1:
                hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
                cos, sin = (part.expand(2, -1, -1).gather(1, kept[..., None].expand(-1, -1, part.shape[-1]))
                            for part in (cos, sin))
                causal = causal[..., :kept.shape[1], :kept.shape[1]]
            hidden = block(hidden, attention_mask=causal, position_embeddings=(cos, sin))
        expected = model.lm_head(backbone.norm(hidden))
    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoding_on_a_pruned_cache_is_consistent(attn):
    """The continuation fed in one pass, token by token, or by generate() gives the same predictions."""
    model = tiny_decoder(attn)
    prompt = torch.randint(5, 500, (2, 30), generator=torch.Generator().manual_seed(2))
    continuation = torch.randint(5, 500, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), apply(model, "fastv", ratio=0.6) as patch:
        first = model(input_ids=prompt, use_cache=True)
        cache = first.past_key_values
        assert [cache.get_seq_length(i) for i in range(4)] == [30, 30, 30, 2 + 28 - 16]
        together = model(input_ids=continuation, past_key_values=cache, use_cache=True).logits
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        stepwise = torch.cat([model(input_ids=continuation[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                              for t in range(continuation.shape[1])], dim=1)
        assert torch.allclose(together, stepwise, atol=1e-5)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
        # decoding steps leave the prefill's trace in place
        assert [(s.layer, s.tokens_before, s.tokens_after) for s in patch.trace.steps] == [(2, 30.0, 14.0)]
        tokens = prompt
        output = model(input_ids=prompt, use_cache=True)
        for _ in range(5):
            next_token = output.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, next_token], dim=1)
            output = model(input_ids=next_token, past_key_values=output.past_key_values, use_cache=True)
        assert torch.equal(generated, tokens)


def test_left_padded_prompts_prune_as_they_would_alone():
    model = tiny_decoder()
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 500, (length,), generator=generator) for length in (26, 17)]
    ids = torch.zeros(2, 26, dtype=torch.long)
    mask = torch.zeros(2, 26, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 26 - len(prompt):] = prompt
        mask[row, 26 - len(prompt):] = 1
    continuation = torch.randint(5, 500, (2, 3), generator=generator)
    with torch.no_grad(), apply(model, "fastv", ratio=0.5) as patch:
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        batch_kept = patch.kept_positions().clone()
        full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        later = model(input_ids=continuation, attention_mask=full_mask, past_key_values=first.past_key_values,
                      use_cache=True).logits
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=prompt[None], use_cache=True)
            offset = 26 - len(prompt)
            kept = batch_kept[row][batch_kept[row] >= 0] - offset
            assert kept.tolist() == patch.kept_positions()[0].tolist()
            assert torch.allclose(alone.logits[0, -1], first.logits[row, -1], atol=1e-4)
            alone_later = model(input_ids=continuation[row:row + 1], past_key_values=alone.past_key_values,
                                use_cache=True).logits
            assert torch.allclose(alone_later[0], later[row], atol=1e-4)


def test_decoder_misuse_is_refused():
    model = tiny_decoder()
    ids = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(5))
    foreign_cache = model(input_ids=ids, use_cache=True).past_key_values  # filled without the patch
    with torch.no_grad(), apply(model, "fastv", ratio=0.5):
        with pytest.raises(PrunekitError, match="labels"):
            model(input_ids=ids, labels=ids)
        with pytest.raises(PrunekitError, match="not filled by a prefill of the patched model"):
            model(input_ids=ids[:, :1], past_key_values=foreign_cache, use_cache=True)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(PrunekitError, match="decode with the batch the prefill used"):
            model(input_ids=ids[:, :1].repeat(2, 1), past_key_values=cache, use_cache=True)


def test_generate_on_left_padded_prompts_matches_each_prompt_alone():
    """generate() builds position ids from the padding mask: the batch must continue each prompt as it would alone."""
    model = tiny_decoder()
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(5, 500, (length,), generator=generator) for length in (26, 15)]
    ids = torch.zeros(2, 26, dtype=torch.long)
    mask = torch.zeros(2, 26, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 26 - len(prompt):] = prompt
        mask[row, 26 - len(prompt):] = 1
    with torch.no_grad(), apply(model, "fastv", ratio=0.5):
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert batch[row, 26:].tolist() == alone[0, len(prompt):].tolist()


def test_a_cache_of_fixed_length_is_refused():
    from transformers import StaticCache

    model = tiny_decoder()
    ids = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), apply(model, "fastv", ratio=0.5):
        with pytest.raises(PrunekitError, match="DynamicCache"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0, cache_implementation="static")
        with pytest.raises(PrunekitError, match="DynamicCache"):
            model(input_ids=ids, past_key_values=StaticCache(config=model.config, max_cache_len=32), use_cache=True)


def test_sliding_window_decoding_masks_kept_tokens_by_their_original_positions():
    """Most of a long prompt removed under a small window: a layer's cache keeps kept tokens the window has
    passed, which decoding must not see. Prefill and decoding equal the unpatched model with the removed
    tokens hidden from the later blocks."""
    from prunekit.tools.support.tokens import HideRemoved
    from tests.models.tiny_models import tiny_causal_lm

    model = tiny_causal_lm("mistral", sliding_window=6)
    prompt = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with apply(model, "random", ratio=0.6, layers=[0]) as patch:
            output = model(input_ids=prompt, use_cache=True)
            kept = patch.kept_positions()[0]
            logits, tokens = [output.logits[0, -1]], []
            for _ in range(4):
                tokens.append(logits[-1].argmax()[None, None])
                output = model(input_ids=tokens[-1], past_key_values=output.past_key_values, use_cache=True)
                logits.append(output.logits[0, -1])
        keep = torch.zeros(1, 24, dtype=torch.bool)
        keep[0, kept] = True
        keep[0, 20:] = True
        reference = HideRemoved(model, 1, keep, causal=True)
        expected = model(input_ids=torch.cat([prompt, *tokens], dim=1)).logits[0]
        reference.remove()
    assert len(kept) == 2 + 18 - 10
    assert torch.allclose(torch.stack(logits[:4]), expected[19:23], atol=1e-4)

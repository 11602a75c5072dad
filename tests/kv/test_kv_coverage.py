"""KV-cache compression on every decoder of the coverage list (``prunekit.tools.support.kv.check``): ratio 0 is the
unpatched generation bit for bit, ratio 0.5 halves every attention layer's cache and continues exactly as the
unpatched model does from the full cache gathered at the kept positions; or prunekit refuses in one line."""

from __future__ import annotations

import pytest
import torch

import prunekit.kv as kv
import prunekit.kv.patch as kv_patch
from prunekit.errors import PrunekitError
from prunekit.tools.support import checked_once
from prunekit.tools.support.kv import check
from prunekit.tools.support.tiny import DECODERS, VOCAB, tiny_causal_lm

WINDOWS = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
_result = checked_once(check, WINDOWS)


@pytest.mark.parametrize("model_type", DECODERS)
def test_kv_compression_works_or_refuses_in_one_line(model_type):
    result = _result(model_type)
    assert result.ok, f"{model_type}: {result.cell()}"
    assert result.detail and "\n" not in result.detail


def test_every_family_of_cache_argument_is_compressed():
    # GPT-NeoX, Falcon and GPTBigCode hand their attention the cache as layer_past; DeepSeek-V3's latent
    # attention caches values narrower than its keys
    for model_type in ("llama", "gpt2", "gpt_neox", "falcon", "gpt_bigcode", "deepseek_v3", "opt"):
        assert _result(model_type).status == "yes", f"{model_type}: {_result(model_type).cell()}"
    working = [model_type for model_type in DECODERS if _result(model_type).status == "yes"]
    assert len(working) >= 25, f"only {len(working)} decoders compress their cache: {working}"


def test_a_cache_the_attention_never_receives_is_refused_not_left_whole(monkeypatch):
    monkeypatch.setattr(kv_patch, "CACHE_NAMES", ("cache", "past_key_values"))  # as if layer_past were unknown
    model = tiny_causal_lm("gpt_neox").eval()
    with kv.apply(model, "tova", ratio=0.5), torch.no_grad():
        with pytest.raises(PrunekitError, match="none of its attention layers received the cache"):
            model(input_ids=WINDOWS[:2, :24], use_cache=True)


def test_sliding_window_caches_are_refused_by_name():
    model = tiny_causal_lm("mistral").eval()  # the tiny config's sliding_window (16) is shorter than the prompt
    with kv.apply(model, "tova", ratio=0.5), torch.no_grad():
        with pytest.raises(PrunekitError, match="sliding-window cache layer"):
            model(input_ids=WINDOWS[:2, :24], use_cache=True)


@pytest.mark.parametrize("layer_types", [["sliding_attention", "full_attention"],
                                         ["full_attention", "sliding_attention"]])
def test_sliding_window_layers_stay_whole_between_compressed_full_attention_layers(layer_types):
    result = check(lambda: tiny_causal_lm("gemma2", layer_types=layer_types), WINDOWS)
    assert result.status == "yes", result.cell()
    model = tiny_causal_lm("gemma2", layer_types=layer_types).eval()
    ids = WINDOWS[:2, :24]
    with kv.apply(model, "tova", ratio=0.5) as patch, torch.no_grad():
        output = model(input_ids=ids, use_cache=True)
        cache = output.cache if "cache" in output else output.past_key_values
        sliding = layer_types.index("sliding_attention")
        full = layer_types.index("full_attention")
        assert set(patch.kept_positions()) == {full} and set(patch.windowed) == {sliding}
        assert cache.layers[full].keys.shape[2] == 12
        assert cache.layers[sliding].keys.shape[2] == 15  # the window's own cropping (sliding_window - 1)
        assert patch.cache_entries() == 2 * model.config.num_key_value_heads * (12 + 15)
        token = WINDOWS[:2, 24:25]
        first = model(input_ids=token, use_cache=True, cache=cache).logits
        patch.rewind(cache)
        again = model(input_ids=token, use_cache=True, cache=cache).logits
    assert torch.equal(first, again)

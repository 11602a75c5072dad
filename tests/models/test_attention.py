"""Reading a block's attention through its kernel, and a block split around its attention."""

import inspect
import sys

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.models.attention import attention_problem, attention_reader, is_causal
from prunekit.models.block_call import BlockCall, candidate_halves, mlp_of, verified_halves
from tests.models.tiny_models import tiny_causal_lm, tiny_encoder


def _layer_inputs(model, ids):
    """The hidden states and arguments the model gives its first block."""
    seen = {}
    block = adapter_for(model).blocks()[0]

    def keep(_module, args, kwargs):
        seen["call"] = BlockCall.bind(inspect.signature(block.forward), args, kwargs)

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen["call"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_reader_sees_queries_and_keys_after_rotary_and_changes_nothing(attn):
    model = tiny_causal_lm("qwen3", attn_implementation=attn)  # q/k norms before the rotary embedding
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    adapter = adapter_for(model)
    call = _layer_inputs(model, ids)
    block = adapter.blocks()[0]
    attention = block.self_attn
    with torch.no_grad():
        expected = block(call.hidden, **call.arguments)
        with attention_reader(adapter, 0).reading() as calls:
            got = block(call.hidden, **call.arguments)
        normed = block.input_layernorm(call.hidden)
        query = attention.q_norm(attention.q_proj(normed).view(2, 10, -1, 16)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(normed).view(2, 10, -1, 16)).transpose(1, 2)
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        query, key = rotate(query, key, *call.arguments["position_embeddings"])
    assert torch.equal(got, expected)
    assert model.config._attn_implementation == attn
    (inputs,) = calls
    assert torch.equal(inputs.query, query) and torch.equal(inputs.key, key)
    assert inputs.scaling == attention.scaling


def test_attention_that_cannot_be_read_is_named_in_one_line():
    assert "has no attention (it mixes tokens with Lfm2ShortConv)" in attention_problem(
        adapter_for(tiny_causal_lm("lfm2")), 0)
    assert "besides its attention" in attention_problem(adapter_for(tiny_causal_lm("falcon_h1")), 0)
    assert "computes its attention scores in its own code" in attention_problem(adapter_for(tiny_causal_lm("bloom")), 0)
    assert attention_problem(adapter_for(tiny_causal_lm("deepseek_v3")), 0) is None  # latent attention reads fine
    with pytest.raises(PrunekitError, match="no attention"):
        attention_reader(adapter_for(tiny_causal_lm("lfm2")), 0)


def test_causality_is_read_from_the_attention():
    assert is_causal(adapter_for(tiny_causal_lm("llama")))
    assert not is_causal(adapter_for(tiny_encoder("bert")))


@pytest.mark.parametrize("model_type, expected", [("llama", "pre-norm"), ("olmo2", "norm-on-output"),
                                                  ("gemma2", "sandwich"), ("phi", None)])
def test_a_split_is_used_only_where_it_reproduces_the_block(model_type, expected):
    model = tiny_causal_lm(model_type)
    adapter = adapter_for(model)
    block = adapter.blocks()[0]
    attention = block.get_submodule(adapter.block_parts(0).attention.module)
    call = _layer_inputs(model, torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(1)))
    candidates = candidate_halves(block, attention, mlp_of(block, attention, None))
    halves = verified_halves(block, type(block).forward.__get__(block), lambda: call, candidates)
    assert (halves.shape if halves else None) == expected  # phi runs attention and MLP in parallel: no split


def test_a_block_argument_holding_unknown_per_token_values_is_refused():
    call = BlockCall(torch.zeros(1, 5, 4), {"alibi": torch.zeros(4, 1, 5), "position_ids": torch.arange(5)[None]})
    with pytest.raises(PrunekitError, match="'alibi'.*holds a value per token"):
        call.follow_tokens(torch.zeros(1, 3, 4), torch.tensor([[0, 2, 4]]), 5)
    followed = BlockCall(call.hidden, {"position_ids": torch.arange(5)[None]}).follow_tokens(
        torch.zeros(1, 3, 4), torch.tensor([[0, 2, 4]]), 5)
    assert followed.arguments["position_ids"].tolist() == [[0, 2, 4]]

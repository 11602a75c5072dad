"""The model adapter reads a model's layout from its structure, for families no one wrote a file for."""

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from tests.models.tiny_models import tiny_causal_lm, tiny_encoder


@pytest.mark.parametrize("model_type, blocks, embeddings, head, norm", [
    ("llama", "model.layers", "model.embed_tokens", "lm_head", "model.norm"),
    ("gpt2", "transformer.h", "transformer.wte", "lm_head", "transformer.ln_f"),
    ("opt", "model.decoder.layers", "model.decoder.embed_tokens", "lm_head", "model.decoder.final_layer_norm"),
    ("phi", "model.layers", "model.embed_tokens", "lm_head", "model.final_layernorm"),
    ("gpt_neox", "gpt_neox.layers", "gpt_neox.embed_in", "lm_head", "gpt_neox.final_layer_norm"),
    ("lfm2", "model.layers", "model.embed_tokens", "lm_head", "model.embedding_norm"),
    ("biogpt", "biogpt.layers", "biogpt.embed_tokens", "output_projection", "biogpt.layer_norm"),
])
def test_layout_is_read_from_structure(model_type, blocks, embeddings, head, norm):
    adapter = adapter_for(tiny_causal_lm(model_type))
    assert (adapter.blocks_path, adapter.embeddings_path, adapter.head_path, adapter.final_norm_path) == \
        (blocks, embeddings, head, norm)
    assert len(adapter.blocks()) == 2


def test_encoders_have_blocks_and_no_final_norm():
    adapter = adapter_for(tiny_encoder("bert"))
    assert adapter.blocks_path == "encoder.layer"
    assert adapter.final_norm_path is None and adapter.head() is None


@pytest.mark.parametrize("model_type, heads, kv_heads, fused, layout", [
    ("llama", 4, 2, False, "stacked"),
    ("gpt2", 4, 4, True, "stacked"),
    ("gpt_bigcode", 4, 1, True, "stacked"),
    ("gpt_neox", 4, 4, True, "per_head"),
    ("falcon", 4, 2, True, "per_group"),
])
def test_head_counts_come_from_the_config_and_agree_with_the_weights(model_type, heads, kv_heads, fused, layout):
    layouts = adapter_for(tiny_causal_lm(model_type)).attention_layouts()
    assert len(layouts) == 2
    first = layouts[0]
    assert (first.num_heads, first.num_kv_heads, first.head_dim, first.fused, first.qkv_layout) == \
        (heads, kv_heads, 16, fused, layout)


def test_a_head_count_that_contradicts_the_weights_is_refused():
    model = tiny_causal_lm("gpt2")
    model.config.n_head = 3  # 3 heads cannot produce the 192 rows of c_attn with head size 16
    model.transformer.h[0].attn.num_heads = 3
    with pytest.raises(PrunekitError, match="fused projection has 192 rows"):
        adapter_for(model).attention_layouts()


def test_mixtures_of_experts_are_found_with_their_routers():
    adapter = adapter_for(tiny_causal_lm("qwen2_moe"))
    experts = adapter.block_parts(0).experts
    assert len(experts) == 1 and experts[0].fused and experts[0].tensors == ["gate_up_proj", "down_proj"]
    assert set(experts[0].routers) == {"mlp.gate", "mlp.shared_expert_gate"}
    names = [t.name for t in adapter.block_weights(0)]
    assert "model.layers.0.mlp.experts.gate_up_proj.3" in names and "model.layers.0.mlp.gate" not in names
    assert adapter.block_parts(0).mlp is None  # the shared expert is not the block's MLP width


def test_hybrid_blocks_offer_only_their_linear_layers():
    adapter = adapter_for(tiny_causal_lm("lfm2"))
    conv_block = adapter.blocks()[0]
    assert adapter.block_parts(0).attention is None or adapter.attention_layout(0) is None
    for target in adapter.block_weights(0):
        assert target.weight.dim() == 2 and target.module in list(conv_block.modules())


def test_conv1d_weights_are_offered_rows_first():
    adapter = adapter_for(tiny_causal_lm("gpt2"))
    c_attn = next(t for t in adapter.block_weights(0) if t.name.endswith("attn.c_attn"))
    assert c_attn.transposed and tuple(c_attn.weight.shape) == (192, 64)
    c_attn.weight[0, 0] = 0.0  # a view: the change reaches the model
    assert float(c_attn.module.weight[0, 0]) == 0.0


def test_named_blocks_override_detection_and_a_wrong_name_is_one_line():
    model = tiny_causal_lm("llama")
    assert adapter_for(model, blocks="model.layers").blocks_path == "model.layers"
    with pytest.raises(PrunekitError, match="no module 'model.blocks'"):
        adapter_for(model, blocks="model.blocks")
    with pytest.raises(PrunekitError, match="not a non-empty list of blocks"):
        adapter_for(model, blocks="model.norm")


def test_named_blocks_hold_for_every_later_look_at_the_same_model():
    model = tiny_causal_lm("llama")
    # a second list of repeated layers that detection would not pick (it prefers the config's layer count)
    model.model.shadow = nn.ModuleList([copy.deepcopy(model.model.layers[0])])
    assert adapter_for(model).blocks_path == "model.layers"
    assert adapter_for(model, blocks="model.shadow").blocks_path == "model.shadow"
    assert adapter_for(model).blocks_path == "model.shadow"  # the job's later steps name nothing
    assert adapter_for(tiny_causal_lm("llama")).blocks_path == "model.layers"  # another model is not affected


def test_a_model_without_repeated_layers_names_the_option():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(PrunekitError, match="--blocks"):
        adapter_for(Flat())

"""What the adapter tells structural pruning: head counts and widths after removal, what the config says, and
which parts are left whole."""

from prunekit.models import adapter_for
from prunekit.models.base import FUSED_EXPERTS, MIXER, OPAQUE_QKV
from prunekit.tools.support.tiny import tiny_causal_lm, tiny_encoder


def test_widths_kept_as_attributes_follow_the_removed_heads():
    model = tiny_causal_lm("gpt_bigcode")  # splits c_attn by embed_dim (queries) and kv_dim (the one key/value head)
    adapter = adapter_for(model)
    attention = model.transformer.h[0].attn
    adapter.set_head_counts(attention, 3, 1, previous=(4, 1))
    assert (attention.num_heads, attention.embed_dim, attention.kv_dim, attention.num_key_value_groups) == (3, 48, 16, 3)
    model = tiny_causal_lm("falcon")  # hidden_size equals the heads' width here; max_position_embeddings does not
    attention = model.transformer.h[0].self_attention
    adapter_for(model).set_head_counts(attention, 2, 1, previous=(4, 2))
    assert (attention.num_heads, attention.num_kv_heads, attention.split_size, attention.hidden_size) == (2, 1, 32, 32)
    assert attention.max_position_embeddings == 128


def test_the_config_is_updated_only_where_it_can_be():
    updates, blockers = adapter_for(tiny_causal_lm("falcon")).structure_config()
    assert "head_dim" not in updates and not blockers  # Falcon derives head_dim: a read-only property
    updates, blockers = adapter_for(tiny_encoder("albert")).structure_config()
    # ALBERT's factorised embeddings have their own width, and its blocks are shared layer groups
    assert updates.get("embedding_size") == 32 and "hidden_size" not in updates and "num_hidden_layers" not in updates
    assert not blockers


def test_parts_left_whole_and_heads_kept_whole_come_with_reasons():
    adapter = adapter_for(tiny_causal_lm("jamba"))  # block 0: a Mamba mixer and an MLP; block 1: attention and experts
    assert adapter.whole_parts() == {"model.layers.0.mamba": MIXER, "model.layers.1.feed_forward.experts": FUSED_EXPERTS}
    assert adapter_for(tiny_causal_lm("llama")).whole_parts() == {}
    adapter = adapter_for(tiny_causal_lm("codegen"))
    assert adapter.head_blocker(adapter.attention_layouts()[0]) == OPAQUE_QKV
    adapter = adapter_for(tiny_causal_lm("gpt_oss"))
    assert adapter.attention_layouts()[0].per_head == ("model.layers.0.self_attn.sinks",)

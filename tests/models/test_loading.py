import torch

from prunekit.models import adapter_for
from prunekit.models.loading import load_causal_lm


def test_default_model_is_smollm2_from_the_cache(smollm2_dir):
    lm = load_causal_lm(None)
    assert lm.name == "SmolLM2-135M-Instruct"
    assert lm.path == smollm2_dir
    config = lm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    assert lm.model.dtype == torch.float32
    adapter = adapter_for(lm.model)
    assert len(adapter.blocks()) == 30 and adapter.heads_are_tied()


def test_adapters_cover_opt_and_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    from prunekit.weights import prune_weights

    opt = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64))
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=100))
    windows = torch.randint(0, 100, (4, 16))
    for model in (opt, neox):
        assert len(adapter_for(model).blocks()) == 2
        result = prune_weights(model.eval(), "sparsegpt", 0.5, calibration=windows)
        assert abs(result.achieved_sparsity - 0.5) < 1e-3


def test_a_model_without_blocks_is_refused_naming_the_option():
    import pytest

    from prunekit.errors import PrunekitError

    class NoBlocks(torch.nn.Module):  # nothing structure could call a block
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(PrunekitError, match="could not find the blocks of NoBlocks.*--blocks"):
        adapter_for(NoBlocks())

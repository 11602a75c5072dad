import json

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.models.loading import load, load_model, resolve


@pytest.mark.slow  # loads a real model
def test_default_model_is_smollm2_from_the_cache(smollm2_dir):
    lm = load_model()
    assert lm.name == "SmolLM2-135M-Instruct"
    assert lm.path == smollm2_dir and (lm.kind, lm.format) == ("causal-lm", "huggingface")
    assert lm.tokenizer is not None
    config = lm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    assert lm.model.dtype == torch.float32
    adapter = adapter_for(lm.model)
    assert len(adapter.blocks()) == 30 and adapter.heads_are_tied()


@pytest.mark.slow  # loads a real model
def test_aliases_resolve_in_one_place(smollm2_dir):
    for spec in (None, "smollm2", "default", "SmolLM2-135M-Instruct"):
        source = resolve(spec)
        assert (source.name, source.path) == ("SmolLM2-135M-Instruct", smollm2_dir)
    minilm = load_model("minilm")
    assert (minilm.name, minilm.kind, type(minilm.model).__name__) == ("all-MiniLM-L6-v2", "encoder", "BertModel")
    assert minilm.tokenizer("a sentence").input_ids[0] == minilm.tokenizer.cls_token_id


def test_fashion_vit_alias_loads_prunekits_vit_from_the_cache(tmp_path, monkeypatch):
    from prunekit.models.vit import ViT
    from prunekit.tokens.vision import save_vit

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    with pytest.raises(PrunekitError, match="the Fashion-MNIST ViT is not trained yet"):
        load_model("fashion-vit")
    torch.manual_seed(0)
    vit = ViT(dim=32, depth=2, num_heads=2).eval()
    save_vit(vit, tmp_path / "models" / "fashion-vit-p4-d6-w192", overwrite=True)
    loaded = load_model("fashion-vit")
    assert (loaded.name, loaded.kind, loaded.format, loaded.tokenizer) == ("fashion-vit", "image-classifier",
                                                                          "prunekit-vit", None)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), vit(images))


def test_load_returns_the_module_and_load_model_adds_the_tokenizer(tiny_model_dir, tmp_path):
    from tests.conftest import tiny_llama

    assert isinstance(load(tiny_model_dir), torch.nn.Module)
    assert prunekit.load is load and prunekit.load_model is load_model
    assert load_model(tiny_model_dir).tokenizer is not None
    tiny_llama().save_pretrained(tmp_path / "bare")  # weights and config, no tokenizer
    bare = load_model(tmp_path / "bare")
    assert bare.tokenizer is None
    with pytest.raises(PrunekitError, match="bare has no tokenizer"):
        bare.require_tokenizer()


def test_the_old_loader_name_still_works_and_says_so(tiny_model_dir):
    from prunekit.models.loading import load_causal_lm

    with pytest.warns(DeprecationWarning, match="load_model"):
        lm = load_causal_lm(str(tiny_model_dir))
    assert lm.tokenizer is not None and lm.kind == "causal-lm"


def test_hub_ids_are_refused_offline_and_missing_paths_named():
    with pytest.raises(PrunekitError, match="hub is unreachable offline"):
        load_model("someorg/some-model")
    with pytest.raises(PrunekitError, match="no such model directory: ./nowhere"):
        load_model("./nowhere")


# --------------------------------------------------- issue 16, item 3: an encoder is no causal LM

@pytest.fixture()
def bert_dir(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_an_encoder_is_refused_as_a_causal_lm_naming_the_commands_that_take_it(bert_dir):
    with pytest.raises(PrunekitError, match=r"is an encoder \(BertModel\): its checkpoint has no causal-LM head, "
                                            r"and this command takes a causal language model; `prunekit shrink` "
                                            r"and `prunekit tokens eval` take encoders"):
        load_model(bert_dir, kind="causal-lm")
    encoder = load_model(bert_dir, kind=("causal-lm", "encoder"))
    assert (encoder.kind, type(encoder.model).__name__) == ("encoder", "BertModel")


def test_a_config_without_architectures_is_judged_by_its_model_type(bert_dir, tiny_model_dir):
    for path in (bert_dir, tiny_model_dir):
        config = json.loads((path / "config.json").read_text())
        del config["architectures"]
        (path / "config.json").write_text(json.dumps(config))
    assert load_model(tiny_model_dir).kind == "causal-lm"  # llama has a causal-LM class and no masked-LM one
    assert load_model(bert_dir).kind == "encoder"
    with pytest.raises(PrunekitError, match=r"bert is an encoder: its checkpoint has no causal-LM head"):
        load_model(bert_dir, kind="causal-lm")


def test_an_image_classifier_is_refused_as_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=7, num_channels=1,
                                        num_labels=10)).save_pretrained(tmp_path / "vit")
    with pytest.raises(PrunekitError, match=r"is an image classifier \(ViTForImageClassification\).*"
                                            r"`prunekit tokens eval` takes image classifiers"):
        load_model(tmp_path / "vit", kind="causal-lm")
    assert load_model(tmp_path / "vit").kind == "image-classifier"


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
    class NoBlocks(torch.nn.Module):  # nothing structure could call a block
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(PrunekitError, match="could not find the blocks of NoBlocks.*--blocks"):
        adapter_for(NoBlocks())

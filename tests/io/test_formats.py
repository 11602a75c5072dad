"""The registered model formats: each detects its own paths, round-trips bit for bit through
prunekit.save / prunekit.load, and every load refuses weights that do not match their config."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from prunekit.errors import PrunekitError
from prunekit.io.formats import FORMATS, LoadOptions, detect_format, load_path
from tests.conftest import tiny_llama

TOKENS = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))


def _bit_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key].view(torch.uint8), state_b[key].view(torch.uint8)), key


def _tiny_gguf(path, hidden=32, layers=2, ff=64, heads=4, kv_heads=2, seed=0):
    """A random llama GGUF with a 30-token byte-pair vocabulary: what llama.cpp writes, in a blink."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġt", "he", "<|endoftext|>"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def random(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    random("token_embd.weight", len(tokens), hidden)
    kv_width = kv_heads * hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        random(f"blk.{i}.attn_q.weight", hidden, hidden)
        random(f"blk.{i}.attn_k.weight", kv_width, hidden)
        random(f"blk.{i}.attn_v.weight", kv_width, hidden)
        random(f"blk.{i}.attn_output.weight", hidden, hidden)
        random(f"blk.{i}.ffn_gate.weight", ff, hidden)
        random(f"blk.{i}.ffn_up.weight", ff, hidden)
        random(f"blk.{i}.ffn_down.weight", hidden, ff)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _shrunk_unevenly(model):
    """Layer 0's MLP narrowed so no config can describe the widths (the shape-spec case)."""
    mlp = model.model.layers[0].mlp
    keep = torch.arange(64)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            layer = getattr(mlp, name)
            narrowed = torch.nn.Linear(layer.in_features, 64, bias=False)
            narrowed.weight.copy_(layer.weight[keep])
            setattr(mlp, name, narrowed)
        down = torch.nn.Linear(64, mlp.down_proj.out_features, bias=False)
        down.weight.copy_(mlp.down_proj.weight[:, keep])
        mlp.down_proj = down
    return model


def test_the_formats_are_registered_and_detected(tmp_path):
    model = tiny_llama(vocab=512)
    prunekit.save(model, tmp_path / "hf")
    prunekit.save(model, tmp_path / "compressed", format="compressed")
    prunekit.save(_shrunk_unevenly(tiny_llama(vocab=512)), tmp_path / "spec", format="shape-spec")
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    prunekit.save(net, tmp_path / "plain", format="safetensors")
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    assert set(FORMATS.names()) >= {"huggingface", "compressed", "shape-spec", "gguf", "safetensors", "prunekit-vit"}
    for name, path in (("huggingface", tmp_path / "hf"), ("compressed", tmp_path / "compressed"),
                       ("shape-spec", tmp_path / "spec"), ("safetensors", tmp_path / "plain"), ("gguf", gguf)):
        assert detect_format(path).name == name


@pytest.mark.parametrize("format", ["huggingface", "compressed"])
@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip_bit_exact(tmp_path, format, tie):
    model = tiny_llama(vocab=512, tie=tie)
    prunekit.save(model, tmp_path / "m", format=format)
    loaded = prunekit.load_model(tmp_path / "m")
    assert (loaded.kind, loaded.format, loaded.tokenizer) == ("causal-lm", format, None)
    _bit_equal(model, loaded.model)
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, prunekit.load(tmp_path / "m")(TOKENS).logits)


def test_shape_spec_directory_is_rebuilt_without_the_structure_package(tmp_path):
    model = _shrunk_unevenly(tiny_llama(vocab=512)).eval()
    prunekit.save(model, tmp_path / "spec", format="shape-spec")
    restored = load_path(tmp_path / "spec")
    assert restored.model.layers[0].mlp.down_proj.in_features == 64
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, restored(TOKENS).logits)


def test_a_plain_module_needs_its_skeleton(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prunekit.save(net, tmp_path / "plain", format="safetensors")
    with pytest.raises(PrunekitError, match="pass the model's skeleton"):
        prunekit.load(tmp_path / "plain")
    rebuilt = prunekit.load(tmp_path / "plain", model=torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                                                           torch.nn.Linear(4, 2)))
    _bit_equal(net, rebuilt)
    with pytest.raises(PrunekitError, match="does not match its config.*lacks tensors the model needs"):
        prunekit.load(tmp_path / "plain", model=torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                                                     torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)))


def test_gguf_is_dequantised_once_and_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    first = prunekit.load_model(gguf)
    assert (first.kind, first.format, first.name, first.path) == ("causal-lm", "gguf", str(gguf), gguf)
    assert first.tokenizer("the").input_ids and first.model.config.num_hidden_layers == 2
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()

    original = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf_reading(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was dequantised a second time"
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf_reading))
    _bit_equal(first.model, prunekit.load(gguf))


def test_a_file_that_is_no_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(PrunekitError, match="is a file; give the model's directory"):
        prunekit.load(tmp_path / "weights.bin")


@pytest.mark.parametrize("content,message", [("{not json", "config.json is corrupt"),
                                             ("[1, 2]", "config.json is corrupt: it holds a JSON list")])
def test_a_corrupt_config_is_one_line(tmp_path, content, message):
    tiny_llama(vocab=512).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(content)
    with pytest.raises(PrunekitError, match=message):
        prunekit.load(tmp_path / "m")


# ------------------------------------------------- issue 16, item 2: no weights filled with random ones

def _with_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_config_with_more_layers_than_the_weights_is_refused(tmp_path):
    tiny_llama(vocab=512, layers=2).save_pretrained(tmp_path / "m")
    _with_config(tmp_path / "m", num_hidden_layers=4)
    with pytest.raises(PrunekitError, match=r"does not match its config: it lacks tensors the model needs "
                                            r"\(model\.layers\.2\..*random weights"):
        prunekit.load(tmp_path / "m")


def test_an_untied_head_that_is_missing_is_refused_a_tied_one_is_not(tmp_path):
    tiny_llama(vocab=512, tie=True).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    prunekit.load(tmp_path / "tied")  # the tied head is the embedding: nothing is missing
    tiny_llama(vocab=512, tie=False).save_pretrained(tmp_path / "untied")
    weights = tmp_path / "untied" / "model.safetensors"
    state = load_file(str(weights))
    del state["lm_head.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PrunekitError, match=r"lacks tensors the model needs \(lm_head\.weight\)"):
        prunekit.load(tmp_path / "untied")


def test_unexpected_and_misshapen_tensors_are_refused(tmp_path):
    tiny_llama(vocab=512).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "model.extra.weight": torch.zeros(3)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(PrunekitError, match=r"holds tensors the model does not have \(model\.extra\.weight\)"):
        prunekit.load(tmp_path / "m")
    save_file(state, str(weights), metadata={"format": "pt"})
    _with_config(tmp_path / "m", intermediate_size=96)
    with pytest.raises(PrunekitError, match=r"other shapes than its config says \(model\.layers\.0\.mlp\.down_proj"):
        prunekit.load(tmp_path / "m")


def test_an_encoder_checkpoint_with_a_head_loads_as_its_body_but_not_with_stray_tensors(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "body")
    masked_lm = BertForMaskedLM(config).eval()
    masked_lm.save_pretrained(tmp_path / "mlm")
    body = prunekit.load_model(tmp_path / "body")
    assert (body.kind, type(body.model).__name__) == ("encoder", "BertModel") and body.model.pooler is not None
    # The masked-LM head (cls.*) is not what an encoder command measures, and the checkpoint has no pooler:
    # the body is built without one, not with a random one.
    encoder = prunekit.load(tmp_path / "mlm")
    assert type(encoder).__name__ == "BertModel" and encoder.pooler is None
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, masked_lm.bert(ids).last_hidden_state)
    weights = tmp_path / "body" / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "encoder.layer.5.output.dense.weight": torch.zeros(2)}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(PrunekitError, match=r"holds tensors the model does not have \(encoder\.layer\.5"):
        prunekit.load(tmp_path / "body")


def test_a_compressed_directory_with_a_tensor_removed_is_refused(tmp_path):
    from prunekit.io.checkpoint import COMPRESSED_MARKER

    prunekit.save(tiny_llama(vocab=512, layers=2), tmp_path / "c", format="compressed")
    _with_config(tmp_path / "c", num_hidden_layers=3)
    assert (tmp_path / "c" / COMPRESSED_MARKER).exists()
    with pytest.raises(PrunekitError, match=r"lacks tensors the model needs \(model\.layers\.2\."):
        load_path(tmp_path / "c", LoadOptions())

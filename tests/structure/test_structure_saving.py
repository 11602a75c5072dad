"""Saving and loading shrunk models (from_pretrained where the config can say it, the shape spec
otherwise), and ONNX exports that onnxruntime runs with PyTorch's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import prunekit
from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.depth import prune_depth
from prunekit.structure.saving import STRUCTURE_FILE, check_onnx, export_onnx, save_structured
from prunekit.structure.zoo import ResNetLike
from prunekit.models.vit import ViT
from structure_helpers import IMAGES, TOKENS, randomize_norms, tiny_bert, tiny_llama

WINDOWS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def _shrunk_llama(allocation: str):
    model = tiny_llama()
    prune_structure(model, 0.15, example_inputs=lm_example_inputs(), importance="flap", calibration=lm_calibration(WINDOWS),
                    allocation={"name": allocation, "round_to": 1})
    return model


def test_uniform_widths_reload_with_plain_from_pretrained(tmp_path):
    model = _shrunk_llama("uniform")
    report = save_structured(model, tmp_path, adapter=adapter_for(model))
    assert report.from_pretrained and report.reasons == [] and not report.remote_code
    assert not (tmp_path / "modeling_shrunk.py").exists() and "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    attention = model.model.layers[0].self_attn
    assert config["intermediate_size"] == model.model.layers[0].mlp.down_proj.in_features
    assert config["num_key_value_heads"] == attention.k_proj.out_features // attention.head_dim
    assert config["attention_bias"] is True  # FLAP's compensation added output biases
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
        assert torch.equal(reloaded(input_ids=TOKENS).logits, expected)
        assert torch.equal(prunekit.load(tmp_path)(input_ids=TOKENS).logits, expected)


def test_per_layer_widths_need_the_shape_spec(tmp_path):
    model = _shrunk_llama("global")
    widths = {layer.mlp.down_proj.in_features for layer in model.model.layers}
    assert len(widths) > 1
    report = save_structured(model, tmp_path, adapter=adapter_for(model))
    assert not report.from_pretrained and "MLP widths differ across layers" in report.reasons[0]
    assert report.remote_code  # trust_remote_code=True loads it (tests/structure/test_structure_remote_code.py)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # refused loudly, never re-initialised
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = prunekit.load(tmp_path)
    assert [l.mlp.down_proj.in_features for l in reloaded.model.layers] == [l.mlp.down_proj.in_features
                                                                             for l in model.model.layers]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)
    from prunekit.models.loading import load

    assert load(tmp_path).model.layers[1].mlp.down_proj.in_features \
        == model.model.layers[1].mlp.down_proj.in_features


def test_bert_heads_and_vision_models_rebuild_from_the_spec(tmp_path):
    bert = tiny_bert()
    prune_structure(bert, 0.2, example_inputs={"input_ids": TOKENS[:1, :4]}, importance="l2",
                    allocation={"name": "uniform", "round_to": 1})
    (tmp_path / "bert").mkdir()
    report = save_structured(bert, tmp_path / "bert", adapter=adapter_for(bert))
    assert not report.from_pretrained and "head size" in report.reasons[0]
    reloaded = prunekit.load(tmp_path / "bert")
    assert reloaded.encoder.layer[0].attention.self.num_attention_heads == bert.encoder.layer[0].attention.self.num_attention_heads
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=TOKENS).last_hidden_state, bert(input_ids=TOKENS).last_hidden_state)

    net = randomize_norms(ResNetLike())
    prune_structure(net, 0.4, example_inputs=(IMAGES,), importance="l1", target="macs")
    (tmp_path / "resnet").mkdir()
    save_structured(net, tmp_path / "resnet")
    with pytest.raises(PrunekitError, match="pass its unpruned skeleton"):
        prunekit.load(tmp_path / "resnet")
    rebuilt = prunekit.load(tmp_path / "resnet", model=ResNetLike())
    with torch.no_grad():
        assert torch.equal(rebuilt(IMAGES), net(IMAGES))
    with pytest.raises(PrunekitError, match="'<root>' is a Sequential in the skeleton but was a ResNetLike"):
        prunekit.load(tmp_path / "resnet", model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    (tmp_path / "resnet" / STRUCTURE_FILE).write_text("{not json")
    with pytest.raises(PrunekitError, match="corrupt shape spec"):
        prunekit.load(tmp_path / "resnet", model=ResNetLike())


def test_depth_pruned_models_rebuild_onto_the_full_skeleton(tmp_path):
    torch.manual_seed(0)
    vit = ViT(dim=32, depth=4, num_heads=2).eval()
    result = prune_depth(vit, "blocks", 2, "influence", [(IMAGES,)])
    kept = [i for i in range(4) if i not in result.removed]
    save_structured(vit, tmp_path, blocks={"blocks": kept})
    rebuilt = prunekit.load(tmp_path, model=ViT(dim=32, depth=4, num_heads=2))
    assert len(rebuilt.blocks) == 2
    expected, got = vit.state_dict(), rebuilt.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # Equal weights; the outputs may still differ in the last bit, since CPU kernels pick their
    # vectorised path by the tensors' memory alignment, which a rebuilt model does not share.
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(IMAGES), vit(IMAGES), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["resnet", "vit", "llama"])
def test_onnx_export_matches_pytorch(tmp_path, which):
    if which == "resnet":
        model = randomize_norms(ResNetLike())
        prune_structure(model, 0.3, example_inputs=(IMAGES,), importance="l2")
        inputs, pick = (torch.randn(2, 1, 28, 28),), None
    elif which == "vit":
        torch.manual_seed(0)
        model = ViT(dim=32, depth=2, num_heads=2).eval()
        prune_structure(model, 0.3, example_inputs=(IMAGES,), importance="l2", granularity="channels,heads")
        assert model.blocks[0].attn.num_heads <= 2
        inputs, pick = (torch.randn(2, 1, 28, 28),), None
    else:
        model = _shrunk_llama("global")
        inputs, pick = (TOKENS,), (lambda output: output.logits)
    path = export_onnx(model, inputs, tmp_path / "model.onnx", output_fn=pick)
    assert check_onnx(path, model, inputs, output_fn=pick) < 1e-4


@pytest.mark.slow  # loads a real model
def test_minilm_heads_and_neurons_shrink_and_reload(tmp_path):
    from prunekit.models.assets import minilm_path

    model = AutoModel.from_pretrained(minilm_path()).eval()
    tokens = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens).last_hidden_state.mean(1)
    result = prune_structure(model, 0.1, example_inputs={"input_ids": tokens[:1, :4]}, importance="l2",
                             allocation={"name": "uniform", "round_to": 1})
    assert sorted({f["kind"] for f in result.families}) == ["channels", "heads"]
    assert len([f for f in result.families if f["kind"] == "heads"]) == 6
    heads = model.encoder.layer[0].attention.self.num_attention_heads
    assert heads < 12 and model.encoder.layer[0].attention.self.query.out_features == heads * 32
    with torch.no_grad():
        after = model(input_ids=tokens).last_hidden_state.mean(1)
    assert float(torch.cosine_similarity(before, after).mean()) > 0.5
    save_structured(model, tmp_path, adapter=adapter_for(model))
    with torch.no_grad():
        assert torch.equal(prunekit.load(tmp_path)(input_ids=tokens).last_hidden_state.mean(1), after)

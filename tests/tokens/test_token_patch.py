"""The patching API on every supported family: exact removal, exact zero ratio, padding, bad input."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.tokens import FAMILIES, METHODS, apply, find_family

from tests.tokens.conftest import hf_vit, prunekit_vit, tiny_bert, tiny_decoder

FAMILY_MODELS = {
    "prunekit-vit": lambda attn: prunekit_vit(),
    "hf-vit": lambda attn: hf_vit(attn),
    "bert": lambda attn: tiny_bert(attn),
    "roberta": lambda attn: tiny_bert(attn, kind="roberta"),
    "llama": lambda attn: tiny_decoder(attn),
}


def run(kind, model, images, padded_text):
    """The model's main output on a fixed batch (padded text for encoders, unpadded for the decoder)."""
    if kind.endswith("vit"):
        output = model(images)
        return output.logits if hasattr(output, "logits") else output
    ids, mask = padded_text
    if kind == "llama":
        return model(input_ids=ids[:, :12].clamp_min(5)).logits
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def snapshot(model):
    return {name: (sorted(module.__dict__), len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in model.named_modules()}


FAMILY_OF = {"prunekit-vit": "prunekit-vit", "hf-vit": "encoder", "bert": "encoder", "roberta": "encoder",
             "llama": "causal-lm"}


def compatible(kind):
    family = FAMILIES.get(FAMILY_OF[kind])
    return [name for name in METHODS.names() if family.can_run(METHODS.get(name))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", list(FAMILY_MODELS))
def test_removing_the_patch_restores_the_model_exactly(kind, attn, images, padded_text):
    if kind == "prunekit-vit" and attn == "eager":
        pytest.skip("prunekit's ViT has one attention implementation")
    model = FAMILY_MODELS[kind](attn)
    before, structure = run(kind, model, images, padded_text), snapshot(model)
    with torch.no_grad():
        for method in compatible(kind):
            patch = apply(model, method, ratio=0.3)
            reduced = run(kind, model, images, padded_text)
            assert not torch.equal(reduced, before) if reduced.shape == before.shape else True
            patch.remove()
            patch.remove()  # harmless
            assert torch.equal(run(kind, model, images, padded_text), before), method
            assert snapshot(model) == structure, method


@pytest.mark.parametrize("kind", list(FAMILY_MODELS))
def test_a_zero_ratio_equals_the_unpatched_model_bit_for_bit(kind, images, padded_text):
    model = FAMILY_MODELS[kind]("sdpa")
    with torch.no_grad():
        expected = run(kind, model, images, padded_text)
        for method in compatible(kind):
            with apply(model, method, ratio=0.0, layers=list(range(find_family(model).depth))) as patch:
                assert torch.equal(run(kind, model, images, padded_text), expected), method
                assert patch.trace.steps == []
        with apply(model, "random", ratio=0.0):
            assert torch.equal(run(kind, model, images, padded_text), expected)
    if kind != "llama":
        with apply(model, "tome", ratio=0.3, r=0):
            assert torch.equal(run(kind, model, images, padded_text), expected)


def test_tome_token_sizes_always_sum_to_the_original_count(images, padded_text):
    vit = prunekit_vit(depth=6)
    with torch.no_grad(), apply(vit, "tome", ratio=0.5) as patch:
        vit(images)
        assert patch.trace.tokens_out < 10
        assert patch.state.sizes.sum(dim=1).tolist() == [50.0] * 5
    bert = tiny_bert()
    ids, mask = padded_text
    with torch.no_grad(), apply(bert, "tome", ratio=0.5) as patch:
        bert(input_ids=ids, attention_mask=mask)
        assert patch.state.sizes.sum(dim=1).tolist() == [20.0, 13.0, 7.0]
        assert (patch.state.sizes[patch.state.valid] >= 1).all()
    with torch.no_grad(), apply(vit, "evit", ratio=0.4) as patch:  # EViT's fused token carries its count too
        vit(images)
        assert patch.state.sizes.sum(dim=1).tolist() == [50.0] * 5


@pytest.mark.parametrize("method", compatible("bert"))
def test_padding_never_displaces_a_real_token(method, padded_text):
    """Each sequence in a padded batch keeps exactly what it keeps alone, and never a padding position."""
    model = tiny_bert()
    ids, mask = padded_text
    with torch.no_grad(), apply(model, method, ratio=0.3) as patch:
        batch_pooled = patch.pool(model(input_ids=ids, attention_mask=mask).last_hidden_state)
        batch_source, batch_valid = patch.kept_positions().clone(), patch.state.valid.clone()
        for row, length in enumerate(mask.sum(dim=1).tolist()):
            alone = model(input_ids=ids[row:row + 1, :length]).last_hidden_state
            kept = batch_source[row][batch_valid[row]]
            assert kept.tolist() == patch.kept_positions()[0].tolist(), (method, row)
            assert (kept < length).all()
            assert torch.allclose(patch.pool(alone)[0], batch_pooled[row], atol=1e-5), (method, row)


@pytest.mark.parametrize("kind", ["hf-vit", "bert", "llama"])
def test_eager_and_sdpa_attention_reduce_the_same_way(kind, images, padded_text):
    methods = ["fastv", "zero-tprune", "divprune"] + (["tome", "evit"] if kind != "llama" else [])
    with torch.no_grad():
        for method in methods:
            outputs = []
            for attn in ("sdpa", "eager"):
                model = FAMILY_MODELS[kind](attn)
                with apply(model, method, ratio=0.4):
                    outputs.append(run(kind, model, images, padded_text))
            assert torch.allclose(outputs[0], outputs[1], atol=2e-5), method


def test_protected_tokens_survive_every_method_at_high_rates(padded_text):
    model = tiny_bert()
    ids, mask = padded_text
    ids = ids.clone()
    ids[:, 5] = 7  # a "special" id in every sequence
    with torch.no_grad():
        for method in compatible("bert"):
            with apply(model, method, ratio=0.9 if method != "tome" else 0.5, protect_ids=[7]) as patch:
                model(input_ids=ids, attention_mask=mask)
                for row, length in enumerate(mask.sum(dim=1).tolist()):
                    kept = set(patch.kept_positions()[row].tolist())
                    assert {0, 5, length - 1} <= kept, (method, row)


def test_the_handle_describes_itself_and_works_as_a_context_manager(images):
    model = prunekit_vit()
    with apply(model, "zero-tprune", ratio=0.2, iterations=5) as patch:
        assert patch.active and "active" in repr(patch)
        info = patch.describe()
        assert info["method"] == {"name": "zero-tprune", "ratio": 0.2, "iterations": 5, "importance_share": 0.5}
        assert info["family"] == "prunekit-vit" and info["layers"] == [1, 2, 3]
        model(images)
        assert [step.layer for step in patch.trace.steps] == [1, 2, 3]
    assert not patch.active and not hasattr(model, "_prunekit_token_patch")


def test_bad_input_is_a_clear_error(padded_text):
    vit = prunekit_vit()
    with apply(vit, "tome", ratio=0.1):
        with pytest.raises(PrunekitError, match="already carries a token patch"):
            apply(vit, "evit", ratio=0.1)
    with pytest.raises(PrunekitError, match="layer 7 does not exist: the model has 4 blocks"):
        apply(vit, "evit", ratio=0.1, layers=[1, 7])
    with pytest.raises(PrunekitError, match="layers is empty"):
        apply(vit, "evit", ratio=0.1, layers=[])
    with pytest.raises(PrunekitError, match="would remove every token"):
        apply(vit, "random", ratio=1.0)
    with pytest.raises(PrunekitError, match="token reduction does not support Linear; supported: .*encoders"):
        apply(nn.Linear(2, 2), "tome")
    decoder = tiny_decoder()
    for method in ("tome", "evit"):
        with pytest.raises(PrunekitError, match="choose one of: attention-magnitude, divprune, fastv, random"):
            apply(decoder, method, ratio=0.2)
    assert snapshot(vit) == snapshot(prunekit_vit()) and not hasattr(decoder, "_prunekit_token_patch")


@pytest.mark.parametrize("kind", ["hf-vit", "bert", "llama"])
def test_attention_that_cannot_be_read_names_the_implementation_to_switch_to(kind):
    model = FAMILY_MODELS[kind]("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrunekitError, match="fastv needs the attention weights.*uses 'flash_attention_2'.*'sdpa'"):
        apply(model, "fastv", ratio=0.2)
    with pytest.raises(PrunekitError, match="additive attention mask.*'flash_attention_2'.*'sdpa'"):
        apply(model, "random", ratio=0.2)


def test_encoder_inputs_that_cannot_be_reduced_are_refused(padded_text):
    model = tiny_bert()
    ids, mask = padded_text
    with apply(model, "tome", ratio=0.2):
        with pytest.raises(PrunekitError, match="2-D padding mask"):
            model(input_ids=ids, attention_mask=mask[:, None, None, :].bool())
        empty = mask.clone()
        empty[2] = 0
        with pytest.raises(PrunekitError, match="all padding"):
            model(input_ids=ids, attention_mask=empty)
    decoder_config = tiny_bert().config
    decoder_config.is_decoder = True
    from transformers import BertModel

    # configured as a decoder, its attention is causal: it is reduced as a causal model, which cannot merge
    with pytest.raises(PrunekitError, match="tome merges tokens.*causal decoder"):
        apply(BertModel(decoder_config), "tome", ratio=0.2)


def test_apply_reads_the_old_keyword_rate_with_a_warning(capsys):
    vit = prunekit_vit()
    with apply(vit, "fastv", rate=0.5, layers=[1]) as patch:
        assert patch.method.ratio == 0.5
    assert "'rate' is deprecated" in capsys.readouterr().err
    with apply(vit, {"name": "tome", "r": 2}, 0.1) as patch:
        assert (patch.method.ratio, patch.method.r) == (0.1, 2)
    with pytest.raises(PrunekitError, match="not both"):
        apply(vit, patch.method, 0.2)

"""Activation-aware criteria (wanda, flap) on the hidden (embedding) width of language models, tied and untied:
scores read every layer that consumes the residual stream and never the embedding table, and FLAP's
compensation goes into the blocks' projections, never into an embedding or the output head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.structure import classifier_calibration, lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.graph import build_graph
from prunekit.structure.importance import get_importance
from prunekit.structure.pipeline import score_families
from prunekit.structure.saving import save_structured
from structure_helpers import TOKENS, tiny_llama

WINDOWS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def _hidden_family(graph):
    hidden = [f for f in graph.families if f.kind == "hidden"]
    assert len(hidden) == 1
    return hidden[0]


@pytest.mark.parametrize("importance", ["flap", "wanda"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_activation_criteria_shrink_the_hidden_width(importance, tie):
    model = tiny_llama(tie=tie)
    result = prune_structure(model, 0.1, example_inputs=lm_example_inputs(), importance=importance,
                             granularity="hidden", calibration=lm_calibration(WINDOWS),
                             allocation={"name": "uniform", "round_to": 1})
    embedding = model.model.embed_tokens
    assert embedding.embedding_dim < 32 and model.lm_head.in_features == embedding.embedding_dim
    assert model.model.layers[1].mlp.gate_proj.in_features == embedding.embedding_dim
    assert (model.lm_head.weight is embedding.weight) == tie
    assert model.lm_head.bias is None and not hasattr(embedding, "bias")
    compensated = model.model.layers[0].self_attn.q_proj.bias is not None
    assert compensated == (importance == "flap")  # FLAP moves removed channels' means into the blocks
    if importance == "flap":
        assert model.model.layers[0].mlp.down_proj.bias is not None  # mlp_bias describes the whole MLP
        assert any("lm_head" in note and "no compensation bias" in note for note in result.notes)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=TOKENS).logits).all()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_wanda_scores_hidden_channels_by_every_layer_that_reads_them(tie):
    model = tiny_llama(tie=tie)
    graph = build_graph(model, lm_example_inputs(), adapter=adapter_for(model))
    family = _hidden_family(graph)
    scores, _ = score_families(graph, [family], get_importance("wanda"), lm_calibration(WINDOWS),
                               adapter_for(model))
    readers = [module for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")]
    assert len(readers) == 2 * 5 + 1
    squares = {id(m): torch.zeros(32, dtype=torch.float64) for m in readers}

    def record(module, args):
        squares[id(module)] += args[0].double().reshape(-1, 32).square().sum(0)

    handles = [m.register_forward_pre_hook(record) for m in readers]
    with torch.no_grad():
        for start in range(0, WINDOWS.shape[0], 4):
            model(input_ids=WINDOWS[start:start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    # Σ over readers of Σ_i |W_ij| · ‖X_j‖; the embedding lookup writes the channels and adds nothing.
    expected = sum(m.weight.detach().double().abs().sum(0) * squares[id(m)].sqrt() for m in readers)
    assert torch.allclose(scores[family.name], expected, rtol=1e-4)


def test_flap_hidden_width_of_a_tied_model_reloads_with_from_pretrained(tmp_path):
    model = tiny_llama(tie=True)
    prune_structure(model, 0.15, example_inputs=lm_example_inputs(), importance="flap",
                    granularity="channels,heads,hidden", calibration=lm_calibration(WINDOWS),
                    allocation={"name": "uniform", "round_to": 1})
    assert model.model.embed_tokens.embedding_dim < 32
    report = save_structured(model, tmp_path, adapter=adapter_for(model))
    assert report.from_pretrained, report.reasons
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)


class _DepthwiseOnly(nn.Module):
    """The expanded channels are read only by a depthwise convolution and a channel sum: no
    Linear or ungrouped convolution consumes them, so no input statistics can score them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.expand = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.depthwise(torch.relu(self.expand(x))).mean((2, 3)).sum(1, keepdim=True)


@pytest.mark.parametrize("importance", ["flap", "wanda"])
def test_activation_criteria_refuse_units_no_layer_reads(importance):
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _DepthwiseOnly().eval()
    with pytest.raises(PrunekitError, match=rf"importance '{importance}' scores units by the inputs of the layers "
                                            r"that read them.*use l2, l1, taylor or random"):
        prune_structure(model, 0.2, example_inputs=(images[:1],), importance=importance,
                        calibration=classifier_calibration(images), allocation={"round_to": 1})
    prune_structure(model, 0.2, example_inputs=(images[:1],), importance="l2", allocation={"round_to": 1})
    assert model.expand.out_channels < 8 and model.depthwise.groups == model.expand.out_channels

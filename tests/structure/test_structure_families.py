"""Structural pruning of transformer families beyond Llama: fused and transposed projections, head layouts,
per-head parameters, parts left whole, routers, and what the config says after blocks are removed."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.structure.depth import remove_blocks
from prunekit.structure.graph import build_graph
from prunekit.structure.pipeline import check_plan
from prunekit.structure.shrink import shrink, zero_units
from prunekit.tools.support.tiny import ENCODERS, VOCAB, tiny_causal_lm, tiny_encoder

TOKENS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def _build(model_type: str, **extra):
    return tiny_encoder(model_type, **extra) if model_type in ENCODERS else tiny_causal_lm(model_type, **extra)


def _inputs(model_type: str) -> dict:
    return {"input_ids": TOKENS} if model_type in ENCODERS else {"input_ids": TOKENS, "use_cache": False}


def _run(model, model_type: str) -> torch.Tensor:
    with torch.no_grad():
        output = model(**_inputs(model_type))
    return output.last_hidden_state if model_type in ENCODERS else output.logits


def _graph(model, model_type: str, mode: str = "kv"):
    return build_graph(model, _inputs(model_type), adapter=adapter_for(model), head_mode=mode)


def _units(family, generator) -> list[int]:
    if family.groups > 1:  # query heads of grouped-query attention: the same number from every group
        per_group = family.size // family.groups
        return [g * per_group + int(torch.randint(per_group, (1,), generator=generator)) for g in range(family.groups)]
    return sorted(torch.randperm(family.size, generator=generator)[:max(1, family.size // 3)].tolist())


# gpt2: Conv1D (weights stored (in, out), products by addmm); gpt_neox: fused rows head by head; falcon: fused
# rows group by group, FalconLinear multiplying by its own weight's transpose; gpt_bigcode: fused multi-query;
# gpt_oss: one attention sink per head; deberta-v2: views of permuted tensors; opt: separate projections.
@pytest.mark.parametrize("model_type, mode, unit", [
    ("gpt2", "kv", "head"), ("gpt_neox", "kv", "head"), ("falcon", "kv", "KV group"), ("falcon", "query", "query head"),
    ("gpt_bigcode", "query", "query head"), ("gpt_oss", "kv", "KV group"), ("deberta-v2", "kv", "head"),
    ("opt", "kv", "head"),
])
def test_every_exact_family_shrinks_to_the_zeroed_model(model_type, mode, unit):
    generator = torch.Generator().manual_seed(0)
    graph = _graph(_build(model_type), model_type, mode)
    heads = [f for f in graph.families if f.kind == "heads"]
    assert heads and {f.unit for f in heads} == {unit} and all(f.exact for f in heads)
    families = [f for f in graph.families if f.exact and f.size > 1]
    for family in families:
        units = _units(family, generator)
        zeroed = _build(model_type)
        zero_graph = _graph(zeroed, model_type, mode)
        zero_units(zero_graph, zero_graph.family(family.name), units)
        shrunk = _build(model_type)
        shrink(_graph(shrunk, model_type, mode), {family.name: units}, adapter=adapter_for(shrunk))
        difference = float((_run(zeroed, model_type) - _run(shrunk, model_type)).abs().max())
        assert difference < 1e-4, f"{model_type}: {family.name} differs by {difference}"
    # The property can fail: removing units changes the outputs.
    family = max(heads, key=lambda f: f.size)
    shrunk = _build(model_type)
    shrink(_graph(shrunk, model_type, mode), {family.name: _units(family, generator)}, adapter=adapter_for(shrunk))
    assert float((_run(shrunk, model_type) - _run(_build(model_type), model_type)).abs().max()) > 1e-4


def test_gpt2_conv1d_sizes_and_split_follow_removed_heads():
    model = _build("gpt2")
    graph = _graph(model, "gpt2")
    shrink(graph, {"transformer.h.0.attn": [1], "transformer.h.0.mlp": list(range(0, 128, 2))},
           adapter=adapter_for(model))
    attention, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    assert (attention.num_heads, attention.split_size, attention.c_attn.nf, attention.c_proj.nx) == (3, 48, 144, 48)
    assert tuple(attention.c_attn.weight.shape) == (64, 144) and (mlp.c_fc.nf, mlp.c_proj.nx) == (64, 64)


@pytest.mark.parametrize("model_type, reason", [
    ("codegen", "order of its fused query/key/value rows"),
    ("bloom", "ALiBi slopes"),
    ("phi3", "query width of the shared config"),
])
def test_heads_that_cannot_go_stay_whole_with_the_reason(model_type, reason):
    graph = _graph(_build(model_type), model_type)
    assert not [f for f in graph.families if f.kind == "heads"]
    notes = [note for note in graph.frozen if "are left whole" in note]
    assert len(notes) == 1 and reason in notes[0]
    assert not any("no head layout" in note for note in graph.frozen)  # the reason covers their channels
    assert [f for f in graph.families if f.kind == "channels"]  # the MLPs still shrink


@pytest.mark.parametrize("model_type, whole, reason", [
    ("mixtral", "model.layers.0.mlp.experts", "fused expert tensors"),
    ("lfm2", "model.layers.0.conv", "state-space or convolution mixer"),
    ("deepseek_v3", "model.layers.0.self_attn", "latent attention"),
])
def test_parts_structural_pruning_does_not_address_are_left_whole(model_type, whole, reason):
    model = _build(model_type)
    graph = _graph(model, model_type)
    assert graph.whole[whole].find(reason) >= 0
    assert any(note.startswith(whole) and reason in note for note in graph.frozen)
    inside = {m.tensor for f in graph.families for m in f.members if m.tensor.startswith(whole + ".")}
    assert not inside
    assert 0 < graph.whole_parameters() < graph.parameter_count()


def test_an_unreachable_ratio_names_the_parts_left_whole():
    model = _build("mixtral")
    with pytest.raises(PrunekitError, match=r"cannot be reached.*\(\d+% of the parameters lie in parts left whole: "
                                            r"fused expert tensors"):
        check_plan(_graph(model, "mixtral"), ratio=0.2, granularity=("channels", "heads"))


def test_router_outputs_are_pinned():
    model = _build("qwen2_moe")
    graph = _graph(model, "qwen2_moe")
    routers = adapter_for(model).routers()
    assert routers
    for family in graph.families:
        assert not any(member.tensor.rpartition(".")[0] in routers and member.dim == 0 for member in family.members)


def test_removed_blocks_leave_the_per_layer_lists_of_the_config_consistent():
    model = _build("lfm2")  # layer 0 a convolution, layer 1 attention
    config = model.config
    config.layer_types = ["conv", "full_attention"]
    config.full_attn_idxs = [1]
    remove_blocks(model, "model.layers", [0])
    assert config.num_hidden_layers == 1 and config.layer_types == ["full_attention"] and config.full_attn_idxs == [0]
    assert model.model.layers[0].self_attn.layer_idx == 0


def test_activation_criteria_read_conv1d_inputs_and_compensate_their_bias():
    from prunekit.structure.pipeline import lm_calibration, lm_example_inputs, prune_structure
    from prunekit.tools.support.structure import model_outputs, zeroed_reference

    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model, original = _build("gpt2"), _build("gpt2")
    before = model.transformer.h[0].mlp.c_proj.bias.detach().clone()
    result = prune_structure(model, 0.2, example_inputs=lm_example_inputs(), importance="flap",
                             calibration=lm_calibration(windows), adapter=adapter_for(model))
    assert "transformer.h.0.mlp.c_proj" in result.shrink.compensated  # block by block, a Conv1D's inputs recorded
    assert not torch.equal(model.transformer.h[0].mlp.c_proj.bias, before)
    reference = zeroed_reference(original, model, result, lm_example_inputs(), "kv")
    difference = (model_outputs(reference, windows, True) - model_outputs(model, windows, True)).abs().max()
    assert float(difference) < 1e-4


@pytest.mark.parametrize("model_type, mode, from_pretrained", [
    ("llama", "kv", True),  # a stored head_dim: the config describes the new head counts
    ("phi", "kv", False),  # the config derives the head size from hidden_size / heads
    ("gpt2", "kv", False), ("gpt_neox", "kv", False), ("falcon", "query", False), ("bert", "kv", False),
])
def test_models_that_lost_heads_save_and_load_back(model_type, mode, from_pretrained, tmp_path):
    import prunekit
    from transformers import AutoModel, AutoModelForCausalLM

    from prunekit.structure.saving import save_structured

    model = _build(model_type)
    graph = _graph(model, model_type, mode)
    # the same units of every attention, so head counts stay equal across layers
    removal = {f.name: [g * (f.size // f.groups) for g in range(f.groups)] for f in graph.families if f.kind == "heads"}
    assert removal
    shrink(graph, removal, adapter=adapter_for(model))
    expected = _run(model, model_type)
    report = save_structured(model, tmp_path, None, adapter_for(model))
    assert report.from_pretrained == from_pretrained, report.reasons
    if from_pretrained:
        loader = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
        reloaded = loader.from_pretrained(tmp_path).eval()
    else:
        reloaded = prunekit.load(tmp_path).eval()
        assert model_type != "phi" or any("derives the head size" in reason for reason in report.reasons)
    assert torch.equal(_run(reloaded, model_type), expected)

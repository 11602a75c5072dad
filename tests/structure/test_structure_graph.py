"""The dependency graph: which slices are coupled, on every kind of model, and the exactness property."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structure.graph import build_graph
from prunekit.structure.measure import count_macs
from prunekit.structure.shrink import shrink

from structure_helpers import IMAGES, SMALL_IMAGES, TOKENS, graph_of, run, shrunk_equals_zeroed, tiny_bert, tiny_llama, vision_models


def _members(family) -> dict[tuple[str, int], torch.Tensor]:
    return {(m.tensor, m.dim): m.index for m in family.members}


def _cases():
    cases = [(name, model, (IMAGES if name == "vit" else SMALL_IMAGES,), "kv") for name, model in vision_models().items()]
    cases.append(("llama-kv", tiny_llama(), {"input_ids": TOKENS, "use_cache": False}, "kv"))
    cases.append(("llama-query", tiny_llama(), {"input_ids": TOKENS, "use_cache": False}, "query"))
    cases.append(("bert", tiny_bert(), {"input_ids": TOKENS}, "kv"))
    return cases


@pytest.mark.parametrize("name,model,inputs,mode", _cases(), ids=[c[0] for c in _cases()])
def test_every_exact_family_shrinks_to_the_zeroed_model(name, model, inputs, mode):
    graph, _ = graph_of(model, inputs, mode)
    exact = [f for f in graph.families if f.exact and f.size > 1]
    assert exact, f"{name}: no prunable family found"
    generator = torch.Generator().manual_seed(0)
    original = run(model, inputs)
    for family in exact:
        if family.groups > 1:  # grouped-query heads: the same number from every group
            per_group = family.size // family.groups
            units = [g * per_group + int(torch.randint(per_group, (1,), generator=generator)) for g in range(family.groups)]
        else:
            count = max(1, family.size // 3)
            units = sorted(torch.randperm(family.size, generator=generator)[:count].tolist())
        difference = shrunk_equals_zeroed(model, inputs, family.name, units, mode, graph)
        assert difference < 1e-5, f"{name}: {family.name} differs by {difference}"
    # The property can fail: removing units does change the model's output.
    family = max(exact, key=lambda f: f.size)
    clone = copy.deepcopy(model)
    clone_graph, adapter = graph_of(clone, inputs, mode)
    shrink(clone_graph, {family.name: list(range(family.size // 2))}, adapter=adapter)
    assert float((run(clone, inputs) - original).abs().max()) > 1e-4


def test_resnet_residual_stages_are_single_families():
    model = vision_models()["resnet"]
    graph = build_graph(model, (IMAGES,))
    stage_families = [f for f in graph.families if any(m.tensor == "stem.0.weight" for m in f.members)]
    assert len(stage_families) == 1
    stem = _members(stage_families[0])
    # The stem's output channels are read by both convolutions of every first-stage block and added to their outputs.
    assert ("layers.0.conv1.0.weight", 1) in stem and ("layers.1.conv2.0.weight", 0) in stem
    assert ("layers.2.shortcut.0.weight", 1) in stem  # the strided shortcut reads the stage's channels
    last = [f for f in graph.families if ("fc.weight", 1) in _members(f)]
    assert len(last) == 1 and last[0].size == 64
    inner = graph.family("layers.0")
    assert set(_members(inner)) == {("layers.0.conv1.0.weight", 0), ("layers.0.conv1.1.weight", 0),
                                    ("layers.0.conv1.1.bias", 0), ("layers.0.conv1.1.running_mean", 0),
                                    ("layers.0.conv1.1.running_var", 0), ("layers.0.conv2.0.weight", 1)}


def test_depthwise_and_squeeze_excitation_couple_with_their_expansion():
    graph = build_graph(vision_models()["mobilenet"], (IMAGES,))
    expansion = [f for f in graph.families if ("blocks.1.expand.0.weight", 0) in _members(f)][0]
    members = _members(expansion)
    # depthwise channel c is expanded channel c; the SE gate (expand rows) multiplies channel c; SE reduce reads it
    assert torch.equal(members[("blocks.1.depthwise.0.weight", 0)], members[("blocks.1.expand.0.weight", 0)])
    assert ("blocks.1.se.expand.weight", 0) in members and ("blocks.1.se.reduce.weight", 1) in members
    assert ("blocks.1.project.0.weight", 1) in members
    assert graph.grouped_convs["blocks.1.depthwise.0.weight"] == 64
    squeeze = graph.family("blocks.1.se")
    assert set(_members(squeeze)) == {("blocks.1.se.reduce.weight", 0), ("blocks.1.se.reduce.bias", 0),
                                      ("blocks.1.se.expand.weight", 1)}


def test_concatenation_offsets_and_flatten_into_linear():
    graph = build_graph(vision_models()["densenet"], (IMAGES,))
    growth = [f for f in graph.families if ("block1.0.conv.weight", 0) in _members(f)][0]
    members = _members(growth)
    # block1.0's new channels follow the 16 stem channels in every later concatenation
    assert members[("block1.1.conv.weight", 1)].reshape(-1).tolist() == list(range(16, 24))
    assert members[("block1.2.conv.weight", 1)].reshape(-1).tolist() == list(range(16, 24))
    assert members[("transition.2.weight", 1)].reshape(-1).tolist() == list(range(16, 24))
    # GroupNorm(4, 48) before the classifier: a unit is a whole group of 12 channels, and each channel
    # is flattened from a 2×2 map into 4 consecutive classifier columns.
    final = [f for f in graph.families if ("classifier.weight", 1) in _members(f)]
    columns = torch.cat([_members(f)[("classifier.weight", 1)].reshape(-1) for f in final]).sort().values
    assert columns.tolist() == list(range(48 * 4))
    for family in final:
        norm = _members(family)[("norm.weight", 0)]
        assert norm.shape[1] == 12 and _members(family)[("classifier.weight", 1)].shape[1] == 48


def test_vit_heads_position_embedding_and_class_token():
    graph = build_graph(vision_models()["vit"], (IMAGES,))
    heads = graph.family("blocks.0.attn")
    assert heads.kind == "heads" and heads.size == 3
    hidden = [f for f in graph.families if f.kind == "hidden"]
    assert len(hidden) == 1 and not hidden[0].exact
    members = _members(hidden[0])
    assert ("pos_embed", 2) in members and ("cls_token", 2) in members and ("head.weight", 1) in members
    assert {graph.family("blocks.0.mlp").size, graph.family("blocks.1.mlp").size} == {192}


def test_llama_tied_embedding_gqa_and_swiglu():
    model = tiny_llama()
    graph, _ = graph_of(model, {"input_ids": TOKENS, "use_cache": False})
    hidden = [f for f in graph.families if f.kind == "hidden"][0]
    keys = _members(hidden)
    # lm_head shares the embedding tensor: one member, not two that could be pruned apart
    assert ("model.embed_tokens.weight", 1) in keys and not any(k[0].startswith("lm_head") for k in keys)
    mlp = graph.family("model.layers.0.mlp")
    assert set(_members(mlp)) == {("model.layers.0.mlp.gate_proj.weight", 0), ("model.layers.0.mlp.up_proj.weight", 0),
                                  ("model.layers.0.mlp.down_proj.weight", 1)}
    attention = graph.family("model.layers.0.self_attn")
    assert attention.unit == "KV group" and attention.size == 2
    q = _members(attention)[("model.layers.0.self_attn.q_proj.weight", 0)]
    assert q.shape == (2, 16)  # two query heads of 8 channels per KV group
    query_graph, _ = graph_of(model, {"input_ids": TOKENS, "use_cache": False}, "query")
    per_head = query_graph.family("model.layers.0.self_attn")
    assert per_head.unit == "query head" and per_head.size == 4 and per_head.groups == 2


def test_bert_heads_and_pinned_hidden_width():
    graph, _ = graph_of(tiny_bert(), {"input_ids": TOKENS})
    kinds = sorted(f.kind for f in graph.families)
    # the encoder's output (last_hidden_state) is the hidden width itself, so it is pinned
    assert kinds == ["channels", "channels", "heads", "heads"]


class _Mixer(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x, dim=-1).real[..., : x.shape[-1]]


class _FFTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.mixer = _Mixer()
        self.b = nn.Linear(5, 4)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.mixer(self.a(x))) .sum(-1, keepdim=True) + self.d(torch.relu(self.c(x)))


def test_unknown_operation_is_named_with_its_module():
    with pytest.raises(PrunekitError, match=r"'fft_rfft' in module 'mixer' \(_Mixer\).*\(strict=False in "
                                            r"build_graph/prune_structure, or --lenient on the command line"):
        build_graph(_FFTNet(), (torch.randn(3, 8),))
    graph = build_graph(_FFTNet(), (torch.randn(3, 8),), strict=False)
    names = [f.name for f in graph.families]
    assert "c" in names and "a" not in names  # the channels around the unknown op are frozen, the rest prunable
    assert any("'fft_rfft' in module 'mixer' (_Mixer)" in note and "left unpruned" in note for note in graph.frozen)


def test_raw_parameter_matrix_and_models_that_do_not_run():
    class RawMatrix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(PrunekitError, match="raw parameter 'w'"):
        build_graph(RawMatrix(), (torch.randn(2, 8),))
    with pytest.raises(PrunekitError, match="does not run on the example input"):
        build_graph(nn.Linear(8, 2), (torch.randn(2, 7),))


def test_cost_model_counts_parameters_and_macs_exactly():
    model = vision_models()["mobilenet"]
    graph = build_graph(model, (IMAGES,))
    # every multiply-accumulate of this network is a convolution or a Linear: the counts must agree exactly
    assert graph.mac_count() == count_macs(model, (IMAGES,))
    removal = {"blocks.1.se": list(range(5)), graph.families[1].name: [0, 3]}
    counts = {name: len(units) for name, units in removal.items()}
    predicted_parameters, predicted_macs = graph.parameter_count(counts), graph.mac_count(counts)
    result = shrink(graph, removal)
    assert result.parameters_after == predicted_parameters < result.parameters_before
    assert count_macs(model, (IMAGES,)) == predicted_macs


class _Conv1dNet(nn.Module):
    """Sequences (batch, channels, length): Conv1d with BatchNorm1d, a depthwise Conv1d, a residual add, and a
    flatten of the last feature map into a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv1d(3, 12, 5, padding=2), nn.BatchNorm1d(12), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv1d(12, 24, 1), nn.BatchNorm1d(24), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv1d(24, 24, 3, padding=1, groups=24), nn.BatchNorm1d(24), nn.ReLU())
        self.project = nn.Sequential(nn.Conv1d(24, 12, 1), nn.BatchNorm1d(12))
        self.reduce = nn.Sequential(nn.Conv1d(12, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(4))
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(self.reduce(x).flatten(1))


def test_conv1d_families_shrink_exactly():
    from structure_helpers import randomize_norms

    model = randomize_norms(_Conv1dNet())
    inputs = (torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0)),)
    graph = build_graph(model, inputs)
    families = {f.name: f for f in graph.families}
    stage = [f for f in families.values() if ("stem.0.weight", 0) in _members(f)][0]
    # the residual add couples the stem's channels with the projection's and with every reader
    assert {("project.0.weight", 0), ("expand.0.weight", 1), ("reduce.0.weight", 1)} <= set(_members(stage))
    expansion = [f for f in families.values() if ("expand.0.weight", 0) in _members(f)][0]
    members = _members(expansion)
    assert torch.equal(members[("depthwise.0.weight", 0)], members[("expand.0.weight", 0)])
    assert graph.grouped_convs["depthwise.0.weight"] == 24
    last = [f for f in families.values() if ("reduce.0.weight", 0) in _members(f)][0]
    # each Conv1d channel is pooled to 4 positions and flattened into 4 consecutive Linear columns
    assert _members(last)[("head.weight", 1)][2].tolist() == [8, 9, 10, 11]
    assert graph.mac_count() == count_macs(model, inputs)
    for family in (stage, expansion, last):
        units = list(range(0, family.size, 3))
        difference = shrunk_equals_zeroed(model, inputs, family.name, units, graph=graph)
        assert difference < 1e-5, f"{family.name} differs by {difference}"
    shrunk = copy.deepcopy(model)
    shrink(build_graph(shrunk, inputs), {expansion.name: list(range(10))})
    assert shrunk.depthwise[0].groups == shrunk.depthwise[0].in_channels == 14 and shrunk.depthwise[1].num_features == 14
    assert shrunk.expand[0].out_channels == 14 and shrunk.project[0].in_channels == 14
    assert float((run(shrunk, inputs) - run(model, inputs)).abs().max()) > 1e-4


def test_query_heads_that_do_not_divide_into_kv_groups_are_refused():
    from prunekit.models.base import ModelAdapter

    class UnevenHeads(ModelAdapter):
        """An attention that reports 4 query heads over 3 key/value heads (a config prunekit cannot split)."""

        def head_counts(self, heads_module, q, k):
            return 4, 3, 8

    model = tiny_llama()
    with pytest.raises(PrunekitError, match=r"model.layers.0.self_attn: 4 query heads do not divide into 3 "
                                            r"key/value groups"):
        build_graph(model, {"input_ids": TOKENS, "use_cache": False}, adapter=UnevenHeads(model))

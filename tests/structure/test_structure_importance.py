"""Importance criteria against hand computations, normalisation, and FLAP's bias compensation."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structure.graph import build_graph
from prunekit.structure.importance import IMPORTANCE, Importance, ScoringContext, get_importance, normalize_scores
from prunekit.structure.pipeline import classifier_calibration, score_families
from prunekit.structure.shrink import shrink
from prunekit.structure.statistics import input_moments


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


DATA = torch.randn(40, 5, generator=torch.Generator().manual_seed(4))
LABELS = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(5))


def _setup(importance: str, **settings):
    model = TwoLayer().eval()
    graph = build_graph(model, (DATA[:2],))
    family = graph.family(graph.families[0].name)
    calibration = classifier_calibration(DATA, LABELS, batch_size=16)
    scores, context = score_families(graph, [family], get_importance({"name": importance, **settings}), calibration, None)
    return model, family, scores[family.name]


def _hidden(model):
    with torch.no_grad():
        return torch.relu(model.fc1(DATA))


def test_registry_names_every_criterion():
    assert IMPORTANCE.names() == ["fisher", "flap", "l1", "l2", "random", "taylor", "wanda"]
    with pytest.raises(PrunekitError, match="unknown importance criterion 'obs'; choose one of: fisher, flap"):
        get_importance("obs")
    with pytest.raises(PrunekitError, match="importance l2: reduction"):
        get_importance({"name": "l2", "reduction": "median"})


def test_magnitude_sums_over_every_weight_of_the_unit():
    model, family, scores = _setup("l2")
    expected = model.fc1.weight.detach().square().sum(1) + model.fc2.weight.detach().square().sum(0)
    assert torch.allclose(scores.float(), expected, atol=1e-6)
    model, family, scores = _setup("l1", reduction="max")
    expected = torch.maximum(model.fc1.weight.detach().abs().sum(1), model.fc2.weight.detach().abs().sum(0))
    assert torch.allclose(scores.float(), expected, atol=1e-6)
    model, family, scores = _setup("l2", reduction="mean", include_norms=True)
    expected = (model.fc1.weight.detach().square().sum(1) + model.fc1.bias.detach().square()
                + model.fc2.weight.detach().square().sum(0)) / 3
    assert torch.allclose(scores.float(), expected, atol=1e-6)


def test_wanda_weights_columns_by_input_norms():
    model, family, scores = _setup("wanda")
    norms = _hidden(model).norm(dim=0)
    expected = model.fc2.weight.detach().abs().sum(0) * norms
    assert torch.allclose(scores.float(), expected, rtol=1e-5)


def test_flap_is_input_variance_times_squared_column_norm():
    model, family, scores = _setup("flap")
    variance = _hidden(model).var(dim=0, unbiased=True)
    expected = model.fc2.weight.detach().square().sum(0) * variance
    assert torch.allclose(scores.float(), expected, rtol=1e-4)


def test_taylor_is_weight_times_gradient_summed_over_the_unit():
    model, family, scores = _setup("taylor")
    reference = TwoLayer()
    total = sum(F.cross_entropy(reference(DATA[i:i + 16]), LABELS[i:i + 16]) for i in range(0, 40, 16))
    total.backward()
    expected = ((reference.fc1.weight * reference.fc1.weight.grad).abs().sum(1)
                + (reference.fc1.bias * reference.fc1.bias.grad).abs()
                + (reference.fc2.weight * reference.fc2.weight.grad).abs().sum(0))
    assert torch.allclose(scores.float(), expected.detach(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind


def test_fisher_is_half_the_mean_squared_gradient_of_a_unit_mask():
    model, family, scores = _setup("fisher")
    reference = TwoLayer()
    squares = torch.zeros(6, dtype=torch.float64)
    for i in range(40):  # a real mask on the hidden units: ∂L/∂m per example, squared, averaged
        mask = torch.ones(6, requires_grad=True)
        logits = reference.fc2(torch.relu(reference.fc1(DATA[i:i + 1])) * mask)
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits, LABELS[i:i + 1]), mask)
        squares += gradient.double().square()
    expected = squares / 40 / 2  # one sample per example, whatever the calibration's batches
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-12)
    assert scores.min() > 0 and all(p.grad is None for p in model.parameters())
    assert get_importance("fisher").default_normalize == "cost"  # a loss estimate, ranked per parameter or MAC removed


def test_fisher_ranks_a_unit_nothing_reads_last():
    model = TwoLayer().eval()
    with torch.no_grad():
        model.fc2.weight[:, 2] = 0  # unit 2 is read by nothing: removing it costs no loss
    graph = build_graph(model, (DATA[:2],))
    family = graph.families[0]
    calibration = classifier_calibration(DATA, LABELS, batch_size=8)
    scores, _ = score_families(graph, [family], get_importance("fisher"), calibration, None)
    scores = scores[family.name]
    assert scores[2] == 0 and (scores[torch.arange(6) != 2] > 0).all()


def test_random_is_seeded():
    model = TwoLayer()
    graph = build_graph(model, (DATA[:2],))
    random = get_importance("random")
    family = graph.families[0]
    first = random.score(family, ScoringContext(graph, seed=1))
    assert torch.equal(first, random.score(family, ScoringContext(graph, seed=1)))
    assert not torch.equal(first, random.score(family, ScoringContext(graph, seed=2)))


def test_activation_criteria_need_calibration():
    model = TwoLayer()
    graph = build_graph(model, (DATA[:2],))
    with pytest.raises(PrunekitError, match="'flap' needs calibration data"):
        score_families(graph, graph.families, get_importance("flap"), None, None)
    no_labels = classifier_calibration(DATA)
    for name in ("taylor", "fisher"):
        with pytest.raises(PrunekitError, match=f"'{name}' needs a loss"):
            score_families(graph, graph.families, get_importance(name), no_labels, None)


def test_normalisations():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 30.0])}

    class Kind:
        def __init__(self, kind):
            self.kind = kind

    families = {"a": Kind("channels"), "b": Kind("heads")}
    assert torch.allclose(normalize_scores(scores, families, "mean")["b"], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.allclose(normalize_scores(scores, families, "max")["a"], torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    standardized = normalize_scores(scores, families, "standardize")["a"]
    assert abs(float(standardized.mean())) < 1e-12 and abs(float(standardized.std()) - 1) < 1e-12
    pooled = normalize_scores(scores, {"a": Kind("channels"), "b": Kind("channels")}, "kind")
    together = torch.cat([pooled["a"], pooled["b"]])
    assert abs(float(together.mean())) < 1e-12 and torch.equal(pooled["a"].argsort(), torch.arange(3))
    assert torch.equal(normalize_scores(scores, families, "none")["b"], scores["b"].double())


def test_flap_bias_compensation_replaces_removed_inputs_by_their_mean():
    model = TwoLayer().eval()
    original = copy.deepcopy(model)
    graph = build_graph(model, (DATA[:2],))
    family = graph.families[0]
    moments = input_moments(model, graph, ["fc2.weight"], classifier_calibration(DATA, batch_size=8).batches)
    removed = [1, 4]
    shrink(graph, {family.name: removed}, compensation={"fc2.weight": moments["fc2.weight"].mean()})
    mean = _hidden(original).mean(0)

    def replace(_module, args):
        x = args[0].clone()
        x[:, removed] = mean[removed]
        return (x,)

    original.fc2.register_forward_pre_hook(replace)
    with torch.no_grad():
        assert torch.allclose(model(DATA), original(DATA), atol=1e-5)
        plain = TwoLayer().eval()
        plain_graph = build_graph(plain, (DATA[:2],))
        shrink(plain_graph, {plain_graph.families[0].name: removed})
        # without compensation the output moves by the removed channels' mean contribution
        assert not torch.allclose(plain(DATA), original(DATA), atol=1e-3)


def test_fisher_of_llama_neurons_and_kv_groups_matches_explicit_masks():
    from structure_helpers import tiny_llama

    from prunekit.models import adapter_for
    from prunekit.structure.pipeline import lm_calibration, lm_example_inputs

    model = tiny_llama(layers=2).double()
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(3))
    graph = build_graph(model, lm_example_inputs(), adapter=adapter_for(model))
    families = [graph.family("model.layers.1.mlp"), graph.family("model.layers.1.self_attn")]
    scores, _ = score_families(graph, families, get_importance("fisher"), lm_calibration(windows, batch_size=2), None)
    layer = model.model.layers[1]
    squares = {"mlp": torch.zeros(64, dtype=torch.float64), "heads": torch.zeros(2, dtype=torch.float64)}
    for window in windows:
        masks = {"mlp": torch.ones(64, dtype=torch.float64, requires_grad=True),
                 "heads": torch.ones(2, dtype=torch.float64, requires_grad=True)}
        # a KV group's mask covers the o_proj inputs of its two query heads (head dim 8: 16 columns each)
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: (args[0] * masks["mlp"],)),
                 layer.self_attn.o_proj.register_forward_pre_hook(
                     lambda _m, args: (args[0] * masks["heads"].repeat_interleave(16),))]
        loss = model(input_ids=window[None], labels=window[None]).loss
        for hook in hooks:
            hook.remove()
        gradients = torch.autograd.grad(loss, [masks["mlp"], masks["heads"]])
        squares["mlp"] += gradients[0].square()
        squares["heads"] += gradients[1].square()
    torch.testing.assert_close(scores["model.layers.1.mlp"], squares["mlp"] / 5 / 2, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(scores["model.layers.1.self_attn"], squares["heads"] / 5 / 2, rtol=1e-6, atol=1e-14)


class _SampleCount:
    """Counts the calibration samples whose gradients reach each family's first-layer weight."""

    def __init__(self, families, context):
        self.families = {f.name: f for f in families}
        self.counts = {name: torch.zeros(f.size, dtype=torch.float64) for name, f in self.families.items()}
        self.seen = 0

    @property
    def tensors(self):
        return ["fc1.weight"]

    def __call__(self, gradients):
        self.seen += 1
        for name in self.counts:  # per unit: the absolute gradient of its fc1 row, one sample at a time
            self.counts[name] += gradients["fc1.weight"].abs().sum(1).double()

    def result(self):
        return {name: total / self.seen for name, total in self.counts.items()}


class _PerSampleCriterion(Importance):  # a criterion of its own, not registered
    name: ClassVar[str] = "per-sample-test"
    needs: ClassVar[frozenset[str]] = frozenset({"sample_gradients"})

    def per_sample(self, families, context):
        return _SampleCount(families, context)

    def score(self, family, context):
        return context.per_sample[family.name]


def test_the_pipeline_provides_what_a_criterion_declares_without_naming_it():
    """A criterion needing per-sample gradients gets them through its own accumulator; the pipeline names none."""
    from prunekit.structure import pipeline

    assert "Fisher" not in open(pipeline.__file__).read()
    model = TwoLayer().eval()
    graph = build_graph(model, (DATA[:2],))
    family = graph.families[0]
    calibration = classifier_calibration(DATA, LABELS, batch_size=16)
    scores, context = score_families(graph, [family], _PerSampleCriterion(), calibration, None)
    expected = torch.zeros(6, dtype=torch.float64)
    for i in range(40):  # one sample at a time, whatever the calibration's batches
        model.zero_grad()
        F.cross_entropy(model(DATA[i:i + 1]), LABELS[i:i + 1]).backward()
        expected += model.fc1.weight.grad.abs().sum(1).double()
    assert torch.allclose(scores[family.name], expected / 40, rtol=1e-5)
    assert context.per_sample == {family.name: scores[family.name]}
    assert not context.gradients and not context.moments  # nothing it did not declare


def test_a_criterion_declaring_per_sample_gradients_must_gather_them():
    class Broken(Importance):
        name: ClassVar[str] = "broken"
        needs: ClassVar[frozenset[str]] = frozenset({"sample_gradients"})

    broken = Broken()
    model = TwoLayer().eval()
    graph = build_graph(model, (DATA[:2],))
    with pytest.raises(PrunekitError, match="importance 'broken' needs per-sample gradients but gathers nothing"):
        score_families(graph, graph.families, broken, classifier_calibration(DATA, LABELS), None)

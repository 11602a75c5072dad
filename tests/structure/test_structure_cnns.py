"""Structural pruning of CNNs of every shape prunekit defines: residual, plain, depthwise-separable with
squeeze-excitation, grouped convolutions, concatenation. Tiny random models, fast."""

from __future__ import annotations

import pytest
import torch
from structure_helpers import randomize_norms, run, shrunk_equals_zeroed

import prunekit
from prunekit.errors import PrunekitError
from prunekit.models.vision import InceptionNet, MobileNetSE, VGGNet
from prunekit.structure import classifier_calibration, prune_structure
from prunekit.structure.allocation import WidthAllocation, _step, allocate
from prunekit.structure.graph import build_graph
from prunekit.structure.importance import get_importance, normalize_scores
from prunekit.structure.measure import count_macs, count_parameters
from prunekit.structure.saving import save_structured
from prunekit.structure.zoo import DenseNetLike, ResNetLike

IMAGES = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))

ARCHITECTURES = {
    "residual": lambda: ResNetLike(widths=(8, 16, 16), blocks=(1, 1, 1)),
    "plain": lambda: VGGNet(widths=(8, 16), convs_per_stage=(1, 2), hidden=32, image_size=16),
    "depthwise-se": lambda: MobileNetSE(stem=8, blocks=((16, 2, 2), (16, 1, 2), (24, 2, 2)), head=32),
    "grouped-concat": lambda: InceptionNet(stem=8, blocks=((8, 16, 4, 8), (16, 32, 4, 8))),
    "concat": lambda: DenseNetLike(growth=8, layers=2),
}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ARCHITECTURES[name](), seed=1)


def rounding_slack(graph, families, target: str, round_to: int) -> int:
    """The most one rounding step of one family costs: how far past the ratio a plan may land."""
    count = graph.parameter_count if target == "params" else graph.mac_count
    total = count()
    return max(total - count({f.name: min(_step(f, round_to), f.size - 1)}) for f in families)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("target", ["params", "macs"])
def test_pruning_removes_the_planned_fraction_and_still_runs(name, target):
    model = tiny(name)
    before = run(model, (IMAGES,))
    graph = build_graph(model, (IMAGES[:1],))
    families = graph.select(["channels"])
    round_to = 4
    slack = rounding_slack(graph, families, target, round_to)
    measured_before = count_parameters(model) if target == "params" else count_macs(model, (IMAGES[:1],))
    ratio = 0.4
    result = prune_structure(model, ratio, example_inputs=(IMAGES[:1],), importance="l2", target=target,
                             granularity="channels", allocation={"name": "global", "round_to": round_to, "floor": 0.2},
                             graph=graph)
    plan = result.plan
    measured_after = count_parameters(model) if target == "params" else count_macs(model, (IMAGES[:1],))
    # The graph's cost model is the measured count, before and after.
    assert (plan.total_before, plan.total_after) == (measured_before, measured_after)
    assert ratio <= plan.achieved <= ratio + slack / plan.total_before
    assert any(kept < units for units, kept in plan.widths.values())
    after = run(model, (IMAGES,))
    assert after.shape == before.shape == (IMAGES.shape[0], 10) and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # something was really removed


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_family_shrinks_to_the_zeroed_model(name):
    model = tiny(name)
    graph = build_graph(model, (IMAGES[:1],))
    families = [f for f in graph.families if f.exact and f.size > 1]
    assert families
    generator = torch.Generator().manual_seed(0)
    for family in families:
        units = sorted(torch.randperm(family.size, generator=generator)[:family.size // 2].tolist())
        assert shrunk_equals_zeroed(model, (IMAGES[:2],), family.name, units, graph=graph) < 1e-5, family.name


def test_the_shapes_are_traced_as_their_couplings_require():
    inception = build_graph(tiny("grouped-concat"), (IMAGES[:1],))
    grouped = [f for f in inception.families if any(m.tensor in inception.grouped_convs for m in f.members)]
    # A grouped 3×3 convolution is one family with its 1×1 reduction: one unit per group of 4.
    assert [f.size for f in grouped] == [4, 4]
    assert all(("blocks.1.grouped.0.0.weight" in {m.tensor for m in f.members}) or
               ("blocks.3.grouped.0.0.weight" in {m.tensor for m in f.members}) for f in grouped)
    # Each concatenated branch is its own family, read by every branch of the next block at its offset.
    branches = ("blocks.1.single.0.weight", "blocks.1.grouped.1.0.weight", "blocks.1.pooled.1.0.weight")
    offsets = []
    for branch in branches:
        family = next(f for f in inception.families if any(m.tensor == branch and m.dim == 0 for m in f.members))
        reader = next(m for m in family.members if m.tensor == "blocks.3.single.0.weight")
        assert reader.dim == 1
        offsets.append(reader.index.flatten().tolist())
    assert offsets == [list(range(0, 8)), list(range(8, 24)), list(range(24, 32))]

    mobilenet = build_graph(tiny("depthwise-se"), (IMAGES[:1],))
    expanded = next(f for f in mobilenet.families if any(m.tensor == "blocks.0.expand.0.weight" and m.dim == 0
                                                         for m in f.members))
    tensors = {(m.tensor, m.dim) for m in expanded.members}
    # The expansion's channels run through the depthwise convolution and are gated by the SE block.
    assert {("blocks.0.depthwise.0.weight", 0), ("blocks.0.se.reduce.weight", 1), ("blocks.0.se.expand.weight", 0),
            ("blocks.0.project.0.weight", 1)} <= tensors


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_saved_cnns_load_back_with_identical_outputs(name, tmp_path):
    model = tiny(name)
    prune_structure(model, 0.5, example_inputs=(IMAGES[:1],), importance="l1", target="macs", granularity="channels",
                    allocation={"name": "global", "round_to": 4, "floor": 0.2})
    save_structured(model, tmp_path)
    rebuilt = prunekit.load(tmp_path, model=ARCHITECTURES[name]())
    assert count_parameters(rebuilt) == count_parameters(model)
    assert torch.equal(run(rebuilt.eval(), (IMAGES,)), run(model, (IMAGES,)))


def test_fisher_buys_macs_at_the_least_loss_per_mac():
    # Fisher's scores are losses; the allocation buys MACs. A unit of the hidden Linear layer costs a few
    # hundred MACs, a convolution channel thousands: at half the loss, the Linear unit is still the dearer
    # loss per MAC removed. Ranked as raw losses (Fisher's default before the CNN benchmark), the cheap
    # losses go first whatever they save: the Linear layer is cut to its floor and the target then needs
    # the convolutions' channels as well.
    model = tiny("plain")
    graph = build_graph(model, (IMAGES[:1],))
    families = graph.select(["channels"])
    hidden = next(f for f in families if any(m.tensor == "classifier.1.weight" and m.dim == 0 for m in f.members))
    offsets = {f.name: torch.arange(f.size, dtype=torch.float64) * 1e-3 for f in families}  # a strict order
    scores = {f.name: (0.5 if f is hidden else 1.0) + offsets[f.name] for f in families}
    per_mac = {f.name: (graph.mac_count() - graph.mac_count({f.name: 1})) for f in families}
    assert all(0.6 / per_mac[hidden.name] > 1.1 / per_mac[f.name] for f in families if f is not hidden)
    settings = {"name": "global", "round_to": 1, "floor": 0.25}
    by_default = allocate(graph, families, scores, 0.3, "macs", WidthAllocation(**settings),
                          default_normalize=get_importance("fisher").default_normalize)
    raw = allocate(graph, families, scores, 0.3, "macs", WidthAllocation(**settings, normalize="none"))
    assert raw.widths[hidden.name][1] == hidden.size // 4  # the raw ranking empties it to the floor
    assert hidden.name not in by_default.removal

    def estimated_loss(plan) -> float:
        return sum(float(scores[name][units].sum()) for name, units in plan.removal.items())

    assert by_default.achieved >= 0.3 and estimated_loss(by_default) < estimated_loss(raw)
    with pytest.raises(PrunekitError, match="cost of one unit"):  # only an allocation knows what a unit costs
        normalize_scores(scores, {f.name: f for f in families}, "cost")


def test_fisher_prunes_a_cnn_ranking_loss_per_mac():
    model = tiny("depthwise-se")
    labels = torch.arange(IMAGES.shape[0]) % 10
    result = prune_structure(model, 0.3, example_inputs=(IMAGES[:1],), importance="fisher", target="macs",
                             granularity="channels", allocation={"name": "global", "round_to": 4, "floor": 0.2},
                             calibration=classifier_calibration(IMAGES, labels, batch_size=2))
    assert result.allocation["normalize"] == "cost" and result.plan.achieved >= 0.3
    assert run(model, (IMAGES,)).shape == (IMAGES.shape[0], 10)

"""Searching every family's width by measurement (issue 18): the knapsack and the evolution for ``prunekit shrink``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from prunekit.cli import main
from prunekit.core.allocation import get_allocation
from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_parameters
from prunekit.models.base import adapter_for
from prunekit.structure.allocation import WidthAllocation
from prunekit.structure.graph import build_graph
from prunekit.structure.pipeline import (WidthSettings, lm_calibration, lm_example_inputs, prune_structure,
                                         score_families)
from prunekit.structure.search import WidthLevelProblem, search_widths, width_grid
from prunekit.structure.shrink import shrink
from tests.conftest import tiny_llama

# a coarse grid keeps the tests quick: two levels of a quarter of an MLP, one KV group
EVOLUTION = {"step": 0.25, "max_ratio": 0.5, "sensitivity_tokens": 32, "generations": 3, "offspring": 4,
             "stage_tokens": [32, 96], "survivors": [2], "start": "knapsack"}


def _model(seed: int = 1):
    return tiny_llama(layers=3, hidden=64, intermediate=256, heads=4, kv_heads=2, vocab=256, seed=seed)


def _windows():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _prune(model, allocation: dict, ratio: float = 0.3):
    return prune_structure(model, ratio, example_inputs=lm_example_inputs(), importance="fisher",
                           allocation=allocation, calibration=lm_calibration(_windows(), 2))


def _problem(model, allocation: dict, ratio: float = 0.3):
    """The search's problem on ``model`` with Fisher scores, as ``prune_structure`` builds it."""
    adapter = adapter_for(model)
    graph = build_graph(model, lm_example_inputs(), adapter=adapter)
    families = graph.select(["channels", "heads"])
    strategy = WidthAllocation(**allocation)
    scores, _ = score_families(graph, families, WidthSettings(importance="fisher").importance,
                               lm_calibration(_windows(), 2), adapter)
    grid = width_grid(graph, families, ratio, "params", strategy, strategy.measured())
    return WidthLevelProblem(graph, adapter, grid, scores, strategy.measured(), _windows()), graph, families, scores


def test_the_plan_removes_exactly_the_budgeted_parameters():
    model = _model()
    result = _prune(model, {"name": "knapsack", "search": {"step": 0.25, "max_ratio": 0.5, "sensitivity_tokens": 32}})
    search = result.search
    removed = search["target_quanta"] * search["quantum"]
    assert count_parameters(model) == result.plan.total_after == result.plan.total_before - removed
    assert search["budget_exact"] and result.plan.achieved >= 0.3
    # the least whole number of quanta reaching the ratio
    assert result.plan.total_before * 0.3 > removed - search["quantum"]
    kept = {unit["name"]: unit["kept"] for unit in search["units"]}
    assert {name: after for name, (_, after) in result.plan.widths.items()} == kept
    assert all((units - kept) % unit["per_step"] == 0 for unit in search["units"]
               for units, kept in [(unit["units"], unit["kept"])])


def test_measuring_leaves_the_model_bit_for_bit_as_it_came_and_zeroing_equals_removing():
    model = _model()
    before = _state(model)
    problem, graph, families, scores = _problem(model, {"name": "evolutionary", "search": EVOLUTION})
    steps = list(problem.grid.max_steps)
    zeroed = problem.fitness(1, steps)
    assert zeroed > 0 and not _same(before, _state(model))
    with torch.no_grad():
        masked_logits = model(input_ids=_windows()[:1]).logits
    problem.set_steps([1 if last else 0 for last in steps])
    problem.set_steps([0] * len(steps))
    assert _same(before, _state(model))  # restored exactly, whatever order levels moved in
    assert problem.fitness(0, [0] * len(steps)) == 0.0
    assert math.isinf(problem.fitness(0, [last + 1 for last in steps]))  # past the floor: never measured
    # the zeroed units removed for real give the same logits: the measurement is the pruned model's
    removal = {f.name: problem.removed(i, s) for i, (f, s) in enumerate(zip(problem.grid.families, steps))}
    shrink(graph, removal, adapter=adapter_for(model))
    with torch.no_grad():
        shrunk_logits = model(input_ids=_windows()[:1]).logits
    assert torch.allclose(masked_logits, shrunk_logits, atol=1e-5)

    fresh = _model()
    untouched = _state(fresh)
    _prune_search_only(fresh)
    assert _same(untouched, _state(fresh))


def _prune_search_only(model):
    adapter = adapter_for(model)
    graph = build_graph(model, lm_example_inputs(), adapter=adapter)
    families = graph.select(["channels", "heads"])
    scores, _ = score_families(graph, families, WidthSettings(importance="fisher").importance,
                               lm_calibration(_windows(), 2), adapter)
    strategy = WidthAllocation(name="evolutionary", search=EVOLUTION)
    return search_widths(graph, adapter, families, scores, 0.3, "params", strategy, _windows())


def test_evolution_never_ends_worse_than_its_start_and_a_seed_fixes_it():
    first = _prune_search_only(_model())[1]
    assert first.fitness <= first.start_fitness and first.evaluations > 1
    again = _prune_search_only(_model())[1]
    assert again.widths == first.widths and again.curve == first.curve
    # from the uniform start: every family one level down meets this ratio exactly
    problem, *_ = _problem(_model(), {"name": "evolutionary", "search": EVOLUTION})
    grid = problem.grid
    ratio = sum(grid.weights) * grid.quantum / grid.total
    problem, *_ = _problem(_model(), {"name": "evolutionary", "search": {**EVOLUTION, "start": "uniform"}}, ratio)
    outcome = get_allocation({"name": "evolutionary", **EVOLUTION, "start": "uniform"}).search(problem)
    assert outcome.start_steps == [1] * len(grid.weights)
    assert outcome.fitness <= outcome.start_fitness


def test_the_evolution_from_the_global_baseline_starts_at_global_and_never_ends_worse():
    """On a grid as fine as the rounding (8 neurons, one KV group a level) the global allocation is a point of the
    grid: the evolution starts exactly there, keeps its budget and ends no worse by its own fitness."""
    fine = {k: v for k, v in EVOLUTION.items() if k not in ("step", "start")} | {"max_ratio": 0.85}
    model = _model()
    heuristic = _prune(_model(), "global")
    result = _prune(model, {"name": "evolutionary", "search": fine})
    search = result.search
    start = {unit["name"]: unit["start_kept"] for unit in search["units"]}
    assert start == {name: kept for name, (_, kept) in heuristic.plan.widths.items() if name in start}
    assert search["fitness"] <= search["start_fitness"] and search["evaluations"] > 1
    assert result.plan.total_after == heuristic.plan.total_after  # the evolution keeps the parent's budget
    assert any(unit["kept"] != unit["start_kept"] for unit in search["units"]) or \
        search["fitness"] == search["start_fitness"]


def test_the_baseline_start_refuses_a_step_and_a_grid_short_of_the_global_widths():
    with pytest.raises(PrunekitError, match="leave out step"):
        _prune(_model(), {"name": "evolutionary", "search": {**EVOLUTION, "start": "baseline"}})
    settings = {k: v for k, v in EVOLUTION.items() if k not in ("step", "start")} | {"max_ratio": 0.15}
    with pytest.raises(PrunekitError, match="raise the search's max_ratio"):
        _prune(_model(), {"name": "evolutionary", "search": settings})


def test_the_search_state_resumes_from_its_database(tmp_path):
    settings = {**EVOLUTION, "database": str(tmp_path / "db")}
    problem, *_ = _problem(_model(), {"name": "evolutionary", "search": {**settings, "generations": 1}})
    allocation = WidthAllocation(name="evolutionary", search={**settings, "generations": 1}).measured()
    allocation.search(problem)
    assert list((tmp_path / "db").glob("width-costs-*.json")) and list((tmp_path / "db").glob("width-search-*.json"))
    resumed, *_ = _problem(_model(), {"name": "evolutionary", "search": settings})
    continued = WidthAllocation(name="evolutionary", search=settings).measured().search(resumed)
    straight, *_ = _problem(_model(), {"name": "evolutionary", "search": EVOLUTION})
    whole = WidthAllocation(name="evolutionary", search=EVOLUTION).measured().search(straight)
    assert continued.steps == whole.steps and continued.curve == whole.curve


def test_the_widths_found_reproduce_the_model_without_searching():
    searched = _model()
    result = _prune(searched, {"name": "evolutionary", "search": EVOLUTION})
    widths = result.search["widths"]
    replayed = _model()
    again = _prune(replayed, {"name": "evolutionary", "search": EVOLUTION, "widths": widths})
    assert again.search is None and again.plan.widths == result.plan.widths
    assert _same(_state(searched), _state(replayed))
    with pytest.raises(PrunekitError, match="not the 60% asked"):
        _prune(_model(), {"name": "evolutionary", "widths": widths}, ratio=0.6)


def test_refused_combinations():
    with pytest.raises(PrunekitError, match="leave out --reconstruct"):
        WidthSettings(allocation={"name": "knapsack"}, reconstruct=True)
    with pytest.raises(PrunekitError, match="bias compensation"):
        WidthSettings(allocation={"name": "knapsack"}, importance="flap")
    with pytest.raises(PrunekitError, match="does not search"):
        WidthAllocation(name="global", search={"step": 0.2})
    with pytest.raises(PrunekitError, match="generation"):
        WidthAllocation(name="evolutionary", search={"generation": 2})
    model = _model()
    with pytest.raises(PrunekitError, match="cannot be reached by the search's grid"):
        _prune(model, {"name": "knapsack", "search": {"max_ratio": 0.2}}, ratio=0.5)


def _args(tiny_dir, out, *extra: str) -> list[str]:
    text = str(tiny_dir.parent / "text.txt")
    return ["shrink", str(tiny_dir), "--out", str(out), "--calib", text, "--test", text, "--calib-samples", "4",
            "--test-windows", "2", "--seq-len", "32", "--runs", "1", "--batch-sizes", "1", "--speed-seq-len", "16",
            "--no-peak-memory", *extra]


def test_shrink_by_search_writes_a_recipe_that_reproduces_the_model_bit_for_bit(tiny_dir, tmp_path, capsys):
    out = tmp_path / "searched"
    code = main(_args(tiny_dir, out, "--ratio", "0.02", "--allocation", "evolutionary",
                      "--allocation-arg", "generations=2", "--allocation-arg", "offspring=3",
                      "--allocation-arg", "stage_tokens=[32, 64]", "--allocation-arg", "sensitivity_tokens=32"))
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    search = report["width"]["search"]
    assert search["fitness"] <= search["start_fitness"] and search["evaluations"] > 1
    assert "Width search (evolutionary)" in (out / "report.md").read_text()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["allocation"]["widths"] == search["widths"]
    assert recipe["allocation"]["search"]["generations"] == 2
    again = tmp_path / "again"
    assert main(["shrink", "--recipe", str(out / "recipe.yaml"), "--out", str(again)]) == 0
    replay = json.loads((again / "report.json").read_text())
    assert replay["width"]["search"] is None  # nothing searched
    assert replay["width"]["plan"]["widths"] == report["width"]["plan"]["widths"]
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("extra,message", [
    (["--allocation", "knapsack", "--reconstruct"], "leave out --reconstruct"),
    (["--allocation", "knapsack", "--override", "model.layers.0.mlp=0.5"], "leave out the overrides"),
    (["--allocation", "knapsack", "--allocation-arg", "annealing=1"], "annealing"),
    (["--allocation", "global", "--allocation-arg", "step=0.2"], "allocation global does not search"),
    (["--allocation", "evolutionary", "--allocation-arg", "step=0.2"], "leave out step"),
    (["--allocation", "knapsack", "--importance", "flap"], "without bias compensation"),
])
def test_bad_search_options_are_one_line_exit_2(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code = main(_args(tiny_dir, out, "--ratio", "0.02", *extra))
    error = capsys.readouterr().err
    assert code == 2 and message in " ".join(error.split()), error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1 and not out.exists()

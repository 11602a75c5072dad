"""Allocation by measurement and search (issue 18) on tiny models: the level database, the searches, and
``prunekit prune --allocation knapsack|evolutionary`` with the recipe it writes."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunekit.cli import main
from prunekit.core.calibration import SequentialCalibration
from prunekit.weights.pipeline import plan_pruning, prune_weights, pruning_settings
from prunekit.weights.search import search_levels
from prunekit.weights.search.database import LevelDatabase, _LevelRecorder, group_units
from prunekit.core.allocation.fitness import KLMeter
from tests.conftest import tiny_llama

SMALL_GRID = {"step": 0.25, "max_ratio": 0.75}


def _model():
    return tiny_llama(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=256, seed=3)


def _calibration():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def _settings(method, allocation, tmp_path, ratio=0.5):
    return pruning_settings(method, ratio, allocation={**SMALL_GRID, "sensitivity_tokens": 32,
                                                        "database": str(tmp_path / "db"), **allocation})


@pytest.mark.parametrize("method,kind", [("wanda", "mask"), ("sparsegpt", "weights")])
def test_level_database_round_trips_bit_exactly(tmp_path, method, kind):
    model, calibration = _model(), _calibration()
    settings = _settings(method, {"name": "knapsack"}, tmp_path)
    plan = plan_pruning(model, settings)
    units = group_units(plan.adapter, plan.targets, "sublayer")
    assert [u.name for u in units] == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                       "model.layers.1.self_attn", "model.layers.1.mlp"]
    grid = [0.0, 0.25, 0.5, 0.75]
    database = LevelDatabase.at(tmp_path / "db", "key", units, grid)
    database.build(plan, calibration, 2)
    # the same levels computed again in memory, from the same dense calibration stream
    recorder = _LevelRecorder(plan, grid)
    stream = SequentialCalibration(plan.adapter, recorder, "dense")
    stream.capture(model, calibration, 2)
    for index, block in enumerate(plan.adapter.blocks()):
        stream.run_block(index, block, [t for u in units if u.block == index for t in u.targets])
    for number, unit in enumerate(units):
        for step in range(len(grid)):
            loaded = database.load(number, step)
            for target in unit.targets:
                stored_kind, tensor = recorder.found[target.name][step]
                expected = tensor if stored_kind != "mask" else torch.where(tensor, target.weight, 0.0)
                assert torch.equal(loaded[target.name].view(torch.int32), expected.view(torch.int32))
                if step > 0:
                    assert stored_kind == kind
                    zeros = float((loaded[target.name] == 0).float().mean())
                    assert zeros == pytest.approx(grid[step], abs=0.05)


def test_search_reuses_its_database_and_leaves_the_model_dense(tmp_path):
    model, calibration = _model(), _calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = search_levels(model, _settings("wanda", {"name": "knapsack"}, tmp_path), calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not first.database["reused"] and first.database["blocks_built"] == 2
    assert first.achieved_ratio == pytest.approx(0.5) and first.budget_exact
    assert set(first.levels) == {t for t in first.levels} and len(first.levels) == 14
    # another budget over the same database: nothing is rebuilt
    again = search_levels(model, _settings("wanda", {"name": "knapsack"}, tmp_path, ratio=0.25), calibration)
    assert again.database["reused"] and again.database["blocks_built"] == 0
    assert again.achieved_ratio == pytest.approx(0.25)
    # an interrupted build resumes at the first unfinished block
    (next((tmp_path / "db").glob("*/block-0001.done"))).unlink()
    resumed = search_levels(model, _settings("wanda", {"name": "knapsack"}, tmp_path), calibration)
    assert resumed.database["blocks_built"] == 1 and resumed.levels == first.levels


EVOLUTION = {"name": "evolutionary", "generations": 3, "offspring": 3, "stage_tokens": [16, 48], "survivors": [2]}


def test_evolution_is_seeded_and_never_worse_than_its_start(tmp_path):
    model, calibration = _model(), _calibration()
    settings = _settings("wanda", EVOLUTION, tmp_path)
    first = search_levels(model, settings, calibration)
    assert first.fitness <= first.start_fitness
    assert first.achieved_ratio == pytest.approx(0.5)
    assert [p["generation"] for p in first.curve] == [0, 1, 2, 3]
    assert first.fitness_tokens == [16, 32, 48]  # the stages, and the unit costs (sensitivity_tokens)
    shutil.rmtree(next((tmp_path / "db").glob("*/searches")))  # forget the finished search's state
    again = search_levels(model, settings, calibration)
    assert again.levels == first.levels and again.curve == first.curve
    # stopped after one generation (its state file kept), then continued: the same search as one run
    shutil.rmtree(next((tmp_path / "db").glob("*/searches")))
    search_levels(model, _settings("wanda", {**EVOLUTION, "generations": 1}, tmp_path), calibration)
    continued = search_levels(model, settings, calibration)
    assert continued.levels == first.levels and continued.curve == first.curve
    assert continued.evaluations == first.evaluations
    # the meter measures KL to the dense model: the (restored) dense model is at 0
    meter = KLMeter(model, plan_pruning(model, settings).adapter, calibration[:3], keep_block_inputs=True)
    assert meter.kl() == 0.0 and meter.kl(first_block=1) == 0.0


def test_reconstruction_proxy_gives_a_knapsack_solution(tmp_path):
    result = search_levels(_model(), _settings("sparsegpt", {"name": "knapsack", "sensitivity": "reconstruction"},
                                                tmp_path), _calibration())
    assert result.achieved_ratio == pytest.approx(0.5)
    assert all(u["cost"] is not None for u in result.units)


def test_the_found_levels_prune_like_explicit_levels(tmp_path):
    model, calibration = _model(), _calibration()
    found = search_levels(model, _settings("wanda", {"name": "knapsack"}, tmp_path), calibration)
    prune_weights(model, "wanda", 0.5, calibration=calibration,
                  allocation={"name": "knapsack", "levels": found.levels})
    for name, module in model.named_modules():
        if name in found.levels:
            zeros = float((module.weight == 0).float().mean())
            assert zeros == pytest.approx(found.levels[name], abs=0.04)


def test_prune_cli_searches_then_its_recipe_reproduces_the_masks(tiny_model_dir, tmp_path, capsys):
    small = ["--no-eval", "--no-compressed", "--calib-samples", "2", "--seq-len", "32", "--ratio", "0.5"]
    allocation = ["--allocation", "knapsack", "--allocation-arg", "step=0.25", "--allocation-arg", "max_ratio=0.75",
                  "--allocation-arg", "sensitivity_tokens=32", "--allocation-arg", f"database={tmp_path / 'db'}"]
    searched, again = tmp_path / "searched", tmp_path / "again"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", *small, *allocation, "--out", str(searched)]) == 0
    recipe = yaml.safe_load((searched / "recipe.yaml").read_text())
    levels = recipe["allocation"]["levels"]
    assert len(levels) == 14 and set(levels.values()) <= {0.0, 0.25, 0.5, 0.75}
    report = json.loads((searched / "report.json").read_text())
    assert report["search"]["achieved_ratio"] == pytest.approx(0.5)
    assert "## Allocation by search" in (searched / "report.md").read_text()
    assert "| database stream | the dense model's inputs |" in (searched / "report.md").read_text()
    assert (searched / "allocation.png").exists()
    shutil.rmtree(tmp_path / "db")  # the recipe needs no database: it does not search again
    assert main(["prune", "--recipe", str(searched / "recipe.yaml"), "--out", str(again)]) == 0
    assert not (tmp_path / "db").exists() and "search" not in json.loads((again / "report.json").read_text())
    a, b = load_file(str(searched / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    code = main(["prune", str(tiny_model_dir), *small, *allocation, "--stream", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--stream" in err
    code = main(["prune", str(tiny_model_dir), *small, *allocation, "--layer-ratio", "*q_proj=0.1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "overrides" in err


def test_a_sparsegpt_search_reports_its_reference_stream_and_sequential_check(tiny_model_dir, tmp_path):
    out = tmp_path / "searched"
    assert main(["prune", str(tiny_model_dir), "--method", "sparsegpt", "--no-eval", "--no-compressed",
                 "--calib-samples", "2", "--seq-len", "32", "--ratio", "0.5", "--allocation", "knapsack",
                 "--allocation-arg", "step=0.25", "--allocation-arg", "max_ratio=0.75", "--allocation-arg",
                 "sensitivity_tokens=32", "--allocation-arg", f"database={tmp_path / 'db'}", "--out", str(out)]) == 0
    search = json.loads((out / "report.json").read_text())["search"]
    assert search["database"]["stream"] == "reference" and search["sequential_check"]["kept"] in ("start", "found")
    markdown = (out / "report.md").read_text()
    assert "| database stream | reference: every earlier layer pruned at 0.5 (layer order) |" in markdown
    assert "| sequential check | pruned as prune prunes, on " in markdown

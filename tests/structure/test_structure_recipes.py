"""The example recipes shipped in docs/recipes validate, and run end to end on a tiny model.

The tiny model's embedding is most of its parameters and it has two blocks, so the run overrides what
depends on the model's size (ratio, blocks) and on the time budget (data, timing, recovery steps);
everything else (criterion, allocation, granularity, heads, recovery mode) comes from the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from prunekit.cli import main
from prunekit.structure.recipe import ShrinkRecipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "docs" / "recipes").glob("*.yaml"))


def test_example_recipes_exist_and_validate():
    names = [path.name for path in RECIPES]
    assert {"smollm2-flap-20.yaml", "smollm2-fisher-20.yaml", "smollm2-depth-6.yaml"} <= set(names)
    for path in RECIPES:
        recipe = ShrinkRecipe.from_yaml(path)
        assert recipe.model is None  # the embedded SmolLM2-135M, which the tests do not run
        written = yaml.safe_load(path.read_text())
        assert ShrinkRecipe.build(yaml.safe_load(recipe.to_yaml())) == recipe  # round trip
        assert set(written) <= set(ShrinkRecipe.model_fields)


def _run(tiny_dir: Path, recipe: Path, out: Path, *extra: str) -> dict:
    text = str(tiny_dir.parent / "text.txt")
    code = main(["shrink", str(tiny_dir), "--recipe", str(recipe), "--out", str(out), "--calib", text, "--test", text,
                 "--calib-samples", "4", "--test-windows", "2", "--seq-len", "32", "--runs", "1", "--batch-sizes", "1,2",
                 "--speed-seq-len", "16", "--no-peak-memory", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def test_flap_recipe_runs_on_a_tiny_model(tiny_dir, tmp_path):
    recipe = RECIPES[[p.name for p in RECIPES].index("smollm2-flap-20.yaml")]
    report = _run(tiny_dir, recipe, tmp_path / "flap", "--ratio", "0.02", "--recover-steps", "2")
    settings = report["settings"]
    assert settings["importance"]["name"] == "flap" and settings["allocation"]["name"] == "global"
    assert settings["granularity"] == ["channels", "heads"] and settings["recovery"]["mode"] == "distill"
    assert report["recovery"]["steps"] == 2 and report["quality"]["after_recovery"] is not None
    assert 0.02 <= report["parameters"]["removed_fraction"] < 0.03
    kept = [after for name, (_, after) in report["width"]["plan"]["widths"].items() if name.endswith(".mlp")]
    assert kept and all(width % 8 == 0 for width in kept)  # round_to from the recipe


def test_fisher_recipe_runs_on_a_tiny_model(tiny_dir, tmp_path):
    recipe = RECIPES[[p.name for p in RECIPES].index("smollm2-fisher-20.yaml")]
    report = _run(tiny_dir, recipe, tmp_path / "fisher", "--ratio", "0.02", "--recover-steps", "2")
    settings = report["settings"]
    assert settings["importance"]["name"] == "fisher" and settings["reconstruct"] is True
    assert settings["recovery"]["train_only"] == ["mlp.", "norm"] and settings["recovery"]["mode"] == "plain"
    assert report["recovery"]["steps"] == 2 and 0.02 <= report["parameters"]["removed_fraction"] < 0.03
    assert "reconstruction refitted" in json.dumps(report["width"])


def test_depth_recipe_runs_on_a_tiny_model(tiny_dir, tmp_path):
    recipe = RECIPES[[p.name for p in RECIPES].index("smollm2-depth-6.yaml")]
    report = _run(tiny_dir, recipe, tmp_path / "depth", "--depth", "1")
    assert report["depth"]["criterion"] == "influence" and report["depth"]["blocks_after"] == 1
    assert report["width"] is None and report["saving"]["from_pretrained"]

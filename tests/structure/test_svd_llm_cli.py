"""SVD-LLM through ``prunekit shrink``: the recipe's method key (unset: deleting units, as before) and the CLI."""

import json

import pytest
import yaml

import prunekit
from prunekit.cli import main
from prunekit.core.lowrank import lowrank_layers
from prunekit.errors import PrunekitError
from prunekit.structure.recipe import ShrinkRecipe

SMALL = ["--calib-samples", "4", "--test-windows", "2", "--seq-len", "64", "--runs", "1", "--no-peak-memory"]


def test_recipes_default_to_deleting_units_and_name_the_method():
    assert ShrinkRecipe.build({}).method is None
    recipe = ShrinkRecipe.build({"method": "svd-llm"})
    assert recipe.method == {"name": "svd-llm", "dampening": 0.01, "sequential": "layer", "update": False,
                             "update_dampening": 0.1}
    assert recipe.with_default_importance("causal-lm").importance is None
    assert ShrinkRecipe.model_validate(yaml.safe_load(recipe.to_yaml())).method == recipe.method
    with pytest.raises(PrunekitError, match="macs"):
        ShrinkRecipe.build({"method": "svd-llm", "target": "macs"})
    with pytest.raises(PrunekitError):
        ShrinkRecipe.build({"method": "no-such-method"})


def test_cli_shrinks_with_svd_llm_and_the_output_reloads_identically(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["shrink", str(tiny_model_dir), "--method", "svd-llm", "--ratio", "0.01", *SMALL,
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"]["name"] == "svd-llm" and report["width"] is None
    assert report["parameters"]["removed_fraction"] >= 0.01
    assert report["method"]["linear_parameters_after"] < report["method"]["linear_parameters_before"]
    assert "svd-llm" in (out / "report.md").read_text()
    loaded = prunekit.load(out, kind="causal-lm")
    assert len(lowrank_layers(loaded)) == len(report["method"]["layers"])
    from transformers import AutoModelForCausalLM
    with pytest.raises(Exception):  # plain from_pretrained finds no weights it knows: it refuses, never guesses
        AutoModelForCausalLM.from_pretrained(out)
    capsys.readouterr()
    assert main(["shrink", str(tiny_model_dir), "--method", "nope", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")

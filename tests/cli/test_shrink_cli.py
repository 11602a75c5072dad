"""``prunekit shrink-graph`` and ``prunekit train recover`` on the job shape: ``--recipe`` in, ``recipe.yaml`` out,
and bad input in one line."""

from __future__ import annotations

import json

import pytest
import yaml

from prunekit.cli import main

TEXT = ("Pruning whole structures makes a model smaller and faster on ordinary hardware. "
        "Recovery fine-tuning trains it a little on calibration text afterwards. ") * 60


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return " ".join(lines[0].split())


@pytest.mark.parametrize("extra", [[], ["--json"], ["--out", "OUT"]])
def test_shrink_graph_refuses_a_config_that_is_a_json_list(extra, tiny_model_dir, tmp_path, capsys):
    (tiny_model_dir / "config.json").write_text(json.dumps([{"model_type": "llama"}]))
    out = tmp_path / "graph"
    assert main(["shrink-graph", str(tiny_model_dir), *[str(out) if a == "OUT" else a for a in extra]]) == 2
    line = _one_line(capsys)
    assert line.startswith("error:") and "config.json is corrupt: it holds a JSON list, not an object" in line, line
    assert not out.exists()


def _heads(graph: dict) -> dict[str, int]:
    return {f["name"]: f["units"] for f in graph["families"] if f["kind"] == "heads"}


def test_shrink_graph_writes_a_recipe_that_reproduces_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "graph"
    assert main(["shrink-graph", str(tiny_model_dir), "--heads", "query", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "prunable families" in printed and f"written: {out}" in printed
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["heads"] == "query" and recipe["model"] == str(tiny_model_dir) and recipe["lenient"] is False
    report = json.loads((out / "report.json").read_text())
    assert _heads(report) and set(_heads(report).values()) == {4}  # every query head is a unit
    assert "| family | kind | units |" in (out / "report.md").read_text()
    assert main(["shrink-graph", "--recipe", str(out / "recipe.yaml"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["families"] == report["families"] and again["parameters"] == report["parameters"]
    assert main(["shrink-graph", "--recipe", str(out / "recipe.yaml"), "--heads", "kv", "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)
    assert set(_heads(kv)) == set(_heads(report)) and set(_heads(kv).values()) == {2}  # the option overrides it
    assert main(["shrink-graph", "--recipe", str(out / "recipe.yaml"), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in _one_line(capsys)


def test_train_recover_takes_a_recipe_and_writes_the_one_it_ran(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    given = tmp_path / "given.yaml"
    given.write_text(yaml.safe_dump({
        "prune": "magnitude", "ratio": 0.5, "mode": "lora", "steps": 5, "rank": 4, "train_windows": 2,
        "train_seq_len": 16, "evaluate_dense": False,
        "data": {"calibration": str(text), "test": str(text), "calibration_samples": 2, "test_windows": 1,
                 "seq_len": 32}}))
    out = tmp_path / "recovered"
    assert main(["train", "recover", str(tiny_model_dir), "--recipe", str(given), "--steps", "3", "--out", str(out)]) == 0
    assert f"written: {out}" in " ".join(capsys.readouterr().out.split())
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["steps"] == 3 and written["mode"] == "lora" and written["rank"] == 4 and written["ratio"] == 0.5
    assert written["model"] == str(tiny_model_dir) and written["data"]["calibration"] == str(text)
    report = json.loads((out / "report.json").read_text())
    recovery = report["recovery"]
    assert recovery["steps"] == 3 and recovery["update"] == "lora" and recovery["objective"] == "plain"
    assert recovery["tokens"] == 3 * 2 * 16 and recovery["layers"] == report["sparsity"]["pruned_layers"] > 0  # a batch: both windows
    assert report["sparsity"]["revived_weights"] == 0 and report["pruning"]["ratio"] == 0.5
    assert (out / "config.json").exists() and "recovery fine-tuning" in (out / "report.md").read_text()
    again = tmp_path / "again"
    assert main(["train", "recover", "--recipe", str(out / "recipe.yaml"), "--out", str(again)]) == 0
    repeated = json.loads((again / "report.json").read_text())
    assert repeated["recovery"]["losses"] == pytest.approx(recovery["losses"], rel=1e-4)  # seeded: the same run


def test_train_recover_reads_the_old_sparsity_option_for_one_more_release(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "recover", str(tiny_model_dir), "--sparsity", "0.3", "--ratio", "0.3", "--out", str(out)]) == 2
    assert _one_line(capsys) == "error: give --ratio or its old name --sparsity, not both"
    old = tmp_path / "old.yaml"
    old.write_text("sparsity: 0.3\nprune: magnitude\n")
    from prunekit.training.recovery import RecoveryRecipe

    assert RecoveryRecipe.from_yaml(old).ratio == 0.3
    assert "'sparsity' is deprecated and goes in the next release; use 'ratio'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", [["shrink-graph"], ["shrink", "--out", "OUT"], ["tokens", "eval", "--out", "OUT"],
                                     ["train", "recover", "--prune", "magnitude", "--out", "OUT"],
                                     ["prune", "--out", "OUT"]])
def test_every_model_command_takes_blocks_and_a_wrong_name_is_one_line(command, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in command]
    assert main([*args, str(tiny_model_dir), "--blocks", "model.norm"]) == 2
    line = _one_line(capsys)
    assert "'model.norm' in LlamaForCausalLM is not a non-empty list of blocks" in line, line
    assert not out.exists()


def test_shrink_graph_groups_the_blocks_it_is_told(tiny_model_dir, capsys):
    assert main(["shrink-graph", str(tiny_model_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert main(["shrink-graph", str(tiny_model_dir), "--blocks", "model.layers", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == found

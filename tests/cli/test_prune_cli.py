"""The prune / eval / sweep commands end to end, and every bad input the issue lists."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml

from prunekit.cli import main

SMALL = ["--calib-samples", "8", "--test-windows", "6", "--seq-len", "256"]


def _digest(path):
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def pruned_runs(tmp_path_factory, smollm2_dir):
    """Wanda and magnitude at 50 % on SmolLM2 through the CLI, on a small calibration set."""
    root = tmp_path_factory.mktemp("runs")
    before = _digest(smollm2_dir)
    runs = {}
    for method in ("wanda", "magnitude"):
        out = root / method
        assert main(["prune", str(smollm2_dir), "--method", method, "--ratio", "0.5", *SMALL,
                     "--out", str(out)]) == 0
        runs[method] = out
    assert _digest(smollm2_dir) == before, "the input model was modified"
    return runs


def test_wanda_beats_magnitude_end_to_end(pruned_runs):
    wanda = json.loads((pruned_runs["wanda"] / "report.json").read_text())
    magnitude = json.loads((pruned_runs["magnitude"] / "report.json").read_text())
    assert wanda["perplexity"]["after"] < magnitude["perplexity"]["after"]
    assert wanda["perplexity"]["before"] == pytest.approx(magnitude["perplexity"]["before"])
    assert wanda["perplexity"]["before"] < wanda["perplexity"]["after"]


def test_report_contents(pruned_runs):
    out = pruned_runs["wanda"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"]["name"] == "wanda" and report["pattern"] == "unstructured"
    assert report["sparsity"]["target"] == 0.5
    assert len(report["layers"]) == 30 * 7
    assert all(abs(layer["achieved"] - 0.5) < 1e-4 for layer in report["layers"])
    assert report["protocol"]["calibration_samples"] == 8 and report["protocol"]["seq_len"] == 256
    assert report["timing"]["prune_seconds"] > 0 and report["memory"]["peak_rss_during_prune_bytes"] > 2**27
    assert report["size"]["compressed_bytes"] <= 0.6 * report["size"]["dense_bytes"]
    assert "do not speed up dense CPU kernels" in report["speed_note"]
    markdown = (out / "report.md").read_text()
    assert "first 6 non-overlapping windows of 256 tokens" in markdown and "model.layers.29.mlp.down_proj" in markdown
    assert (out / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method"]["name"] == "wanda" and recipe["data"]["calibration_samples"] == 8


def test_outputs_load_back(pruned_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prunekit

    out = pruned_runs["wanda"]
    dense = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    compressed = prunekit.load(out / "compressed")
    for (name, a), (_, b) in zip(dense.state_dict().items(), compressed.state_dict().items()):
        assert torch.equal(a, b), name
    assert dense.model.layers[0].mlp.up_proj.weight.eq(0).float().mean() >= 0.5


def test_eval_command_reproduces_the_report(pruned_runs, capsys):
    out = pruned_runs["wanda"]
    report = json.loads((out / "report.json").read_text())
    assert main(["eval", str(out / "compressed"), "--test-windows", "6", "--seq-len", "256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["perplexity"] == pytest.approx(report["perplexity"]["after"], rel=1e-5)


def test_recipe_round_trip_and_cli_override(tmp_path, tiny_model_dir):
    from prunekit import Recipe

    recipe = Recipe.build({"model": str(tiny_model_dir), "method": {"name": "sparsegpt", "dampening": 0.02},
                           "pattern": "2:4", "data": {"calibration_samples": 2, "seq_len": 64, "test_windows": 2}})
    text = recipe.to_yaml()
    assert Recipe.build(yaml.safe_load(text)) == recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["prune", "--recipe", str(path), "--method-arg", "block_size=32", "--out", str(tmp_path / "o")]) == 0
    used = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())
    assert used["method"] == {"name": "sparsegpt", "dampening": 0.02, "block_size": 32}
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["sparsity"]["target"] == 0.5


def test_sweep_writes_table_and_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_model_dir), "--method", "magnitude", "--ratios", "0.2,0.6",
                 "--calib-samples", "2", "--test-windows", "2", "--seq-len", "64", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [p["ratio"] for p in data["points"]] == [0.2, 0.6]
    assert (out / "sweep.png").exists() and "| 60% |" in (out / "report.md").read_text()
    assert "ratios:" in (out / "recipe.yaml").read_text()


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--ratio" in result.stdout


# ---------------------------------------------------------------- bad input


def _fails(args, capsys, message, tmp_path):
    out = tmp_path / "out"
    code = main([*args, "--out", str(out)] if "--out" not in args else args)
    err = capsys.readouterr().err
    assert code != 0
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or "--overwrite" in message
    return err


TINY = ["--calib-samples", "2", "--test-windows", "2", "--seq-len", "64"]


@pytest.mark.parametrize("ratio", ["1.0", "-0.2", "1.5"])
def test_ratio_out_of_range(tiny_model_dir, tmp_path, capsys, ratio):
    _fails(["prune", str(tiny_model_dir), "--ratio", ratio], capsys, "ratio must be in [0, 1)", tmp_path)


def test_the_old_name_of_the_ratio_still_works_with_a_warning(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.3", "--no-eval",
                 "--no-compressed", "--out", str(out)]) == 0
    assert "--sparsity is deprecated" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["sparsity"]["target"] == 0.3
    _fails(["prune", str(tiny_model_dir), "--sparsity", "0.3", "--ratio", "0.4"], capsys,
           "give --ratio or its old name --sparsity, not both", tmp_path)


def test_malformed_pattern(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--pattern", "2-4"], capsys, "malformed pattern '2-4'", tmp_path)


def test_pattern_that_does_not_divide_a_layer(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--pattern", "3:7", *TINY], capsys,
           "input width 64 is not a multiple of 7", tmp_path)


def test_unknown_method_and_allocation(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--method", "obs"], capsys, "unknown method 'obs'", tmp_path)
    _fails(["prune", str(tiny_model_dir), "--allocation", "spiky"], capsys, "unknown allocation 'spiky'", tmp_path)


def test_missing_and_corrupt_model(tmp_path, capsys):
    _fails(["prune", str(tmp_path / "nope")], capsys, "no such model directory", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    _fails(["prune", str(broken)], capsys, "has no config.json", tmp_path)
    (broken / "config.json").write_text("{not json")
    _fails(["prune", str(broken)], capsys, "config.json is corrupt", tmp_path)


def test_corrupt_weights(tiny_model_dir, tmp_path, capsys):
    (tiny_model_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    _fails(["prune", str(tiny_model_dir), *TINY], capsys, "could not load model from", tmp_path)


def test_hub_id_while_offline(tmp_path, capsys):
    _fails(["prune", "someorg/some-model"], capsys, "hub is unreachable offline", tmp_path)


def test_calibration_text_shorter_than_a_window(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    _fails(["prune", str(tiny_model_dir), "--calib", str(short), "--no-eval"], capsys,
           "shorter than one window of 512", tmp_path)


def test_bad_jsonl(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    _fails(["prune", str(tiny_model_dir), "--calib", str(data)], capsys, "data.jsonl:2 has no string field 'text'",
           tmp_path)


def test_nan_weights(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    model.save_pretrained(tiny_model_dir)
    capsys.readouterr()
    _fails(["prune", str(tiny_model_dir), *TINY], capsys,
           "weight model.layers.1.mlp.up_proj.weight contains NaN or inf", tmp_path)


def test_existing_output_without_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails(["prune", str(tiny_model_dir), "--out", str(out)], capsys, "already exists; pass --overwrite", tmp_path)
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", *TINY, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


def test_output_equal_to_input(tiny_model_dir, tmp_path, capsys):
    before = _digest(tiny_model_dir)
    _fails(["prune", str(tiny_model_dir), "--out", str(tiny_model_dir), "--overwrite"], capsys,
           "is the input itself", tmp_path)
    assert _digest(tiny_model_dir) == before


def test_conflicting_sparsity_and_pattern(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--pattern", "2:4", "--ratio", "0.7"], capsys,
           "ratio 0.7 conflicts with pattern 2:4", tmp_path)


def test_global_allocation_needs_comparable_scores(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--method", "wanda", "--allocation", "global", *TINY], capsys,
           "only comparable within a layer", tmp_path)


def test_tied_head_needs_untie(tiny_model_dir, tmp_path, capsys):
    _fails(["prune", str(tiny_model_dir), "--method", "magnitude", "--include", "lm_head", *TINY], capsys,
           "pass --untie-embeddings", tmp_path)
    out = tmp_path / "untied"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--include", "lm_head", "--untie-embeddings",
                 *TINY, "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.eq(0).float().mean() == pytest.approx(0.5, abs=1e-3)
    assert model.model.embed_tokens.weight.eq(0).float().mean() < 0.01

"""``prunekit prune``'s options of issue 21 end to end on a tiny model: ``--format compressed-tensors``, an
llm-compressor recipe through ``--recipe``, and ``--tasks`` in ``prune`` and ``eval``."""

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.weights.recipe import WeightPruningRecipe
from tests.io.test_compressed_tensors_format import WEIGHTS_FILE, _bit_equal, _library_decompressed
from tests.weights.test_llmcompressor_recipe import REFUSALS, SPARSEGPT_24, WANDA_NAMED


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_prune_writes_both_sizes_and_streaming_refuses(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--method", "magnitude", "--no-eval", "--calib-samples", "2", "--seq-len", "64"]
    assert main(["prune", str(tiny_model_dir), *tiny, "--format", "compressed-tensors", "--out", str(out)]) == 0
    size = json.loads((out / "report.json").read_text())["size"]
    assert size["format"] == "compressed-tensors"
    assert size["compressed_bytes"] == (out / "compressed" / WEIGHTS_FILE).stat().st_size
    assert size["formats"]["compressed-tensors"] == size["compressed_bytes"]
    # bitmask + zstd beats plain bitmask + values on the same weights
    assert 0 < size["formats"]["prunekit"] < size["formats"]["compressed-tensors"]
    assert "format: compressed-tensors" in (out / "recipe.yaml").read_text()
    assert "the two compressed formats" in (out / "report.md").read_text()
    got = _library_decompressed(out / "compressed")
    from safetensors.torch import load_file

    dense = load_file(str(out / "model.safetensors"))
    assert all(_bit_equal(got[name], dense[name]) for name in got)
    capsys.readouterr()
    code = main(["prune", str(tiny_model_dir), *tiny, "--format", "compressed-tensors", "--stream",
                 "--out", str(tmp_path / "streamed")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "compressed-tensors" in err


@pytest.mark.parametrize("text,options", [
    (SPARSEGPT_24, ["--method", "sparsegpt", "--pattern", "2:4", "--method-arg", "dampening=0.001",
                    "--method-arg", "block_size=64"]),
    (WANDA_NAMED, ["--method", "wanda", "--ratio", "0.5", "--include", "model.layers.0.*", "--exclude", "*o_proj"]),
], ids=["sparsegpt-2:4", "wanda-named"])
def test_run_gives_the_same_masks_as_prunekit_options(tiny_model_dir, tmp_path, text, options):
    small = ["--no-eval", "--no-compressed", "--calib-samples", "2", "--seq-len", "64"]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(_write(tmp_path, text)), *small,
                 "--out", str(theirs)]) == 0
    assert main(["prune", str(tiny_model_dir), *options, *small, "--out", str(ours)]) == 0
    a, b = load_file(str(theirs / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k] == 0, b[k] == 0) and torch.equal(a[k], b[k]) for k in a)
    pruned = [k for k in a if float((a[k] == 0).float().mean()) > 0.3]
    assert pruned and all(".o_proj" not in k for k in pruned) if "o_proj" in text else pruned
    # the recipe written beside the output is prunekit's own, and repeats the run
    assert yaml.safe_load((theirs / "recipe.yaml").read_text())["method"]["name"] in ("sparsegpt", "wanda")


@pytest.mark.parametrize("text,message", REFUSALS)
def test_refusals_through_the_command_line(tiny_model_dir, tmp_path, capsys, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(PrunekitError, match=re.escape(message)):
        WeightPruningRecipe.from_yaml(path)
    code = main(["prune", str(tiny_model_dir), "--recipe", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_prunekit_recipes_are_read_as_before(tmp_path):
    recipe = WeightPruningRecipe.build({"method": "sparsegpt", "pattern": "2:4"})
    path = _write(tmp_path, recipe.to_yaml())
    assert WeightPruningRecipe.from_yaml(path) == recipe


def test_eval_and_prune_report_task_accuracy(tiny_model_dir, tmp_path, capsys):
    tasks = ["--tasks", "wiki_continuation", "--task-examples", "4"]
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_model_dir), *tasks, "--test-windows", "2", "--seq-len", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())["tasks"]
    assert set(report["after"]) == {"wiki_continuation"} and report["protocol"]["examples"] == 4
    assert "wiki_continuation acc_norm" in (out / "report.md").read_text()
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--ratio", "0.7", "--no-eval",
                 "--no-compressed", *tasks, "--out", str(pruned)]) == 0
    report = json.loads((pruned / "report.json").read_text())["tasks"]
    assert report["before"]["wiki_continuation"]["examples"] == 4 and "after" in report
    text = (pruned / "report.md").read_text()
    assert "## Zero-shot tasks" in text and "LAMBADA" not in text and "multiple choice" in text
    assert "tasks:" in (pruned / "recipe.yaml").read_text()
    capsys.readouterr()
    for args in (["--tasks", "hellaswag"], ["--tasks", "wiki_lastword", "--stream"]):
        code = main(["prune", str(tiny_model_dir), "--no-eval", *args, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()

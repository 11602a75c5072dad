"""``prunekit shrink`` end to end on a tiny model directory, its recipe round trip, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from prunekit.cli import main


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def _args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    text = str(tiny_dir.parent / "text.txt")
    return ["shrink", str(tiny_dir), "--out", str(out), "--calib", text, "--test", text, "--calib-samples", "4",
            "--test-windows", "2", "--seq-len", "32", "--runs", "1", "--batch-sizes", "1,2", "--speed-seq-len", "16",
            "--round-to", "1", *extra]


def test_shrink_writes_a_smaller_model_its_report_and_a_recipe_that_reproduces_it(tiny_dir, tmp_path, capsys):
    before = _fingerprint(tiny_dir)
    out = tmp_path / "out"
    code = main(_args(tiny_dir, out, "--ratio", "0.02", "--recover", "--recover-steps", "2", "--onnx", "--reconstruct",
                        "--reconstruct-damping", "0.3", "--recover-train-only", "mlp.", "--recover-train-only", "norm"))
    assert code == 0, capsys.readouterr()
    assert _fingerprint(tiny_dir) == before  # the input is never modified
    report = json.loads((out / "report.json").read_text())
    assert 0.02 <= report["parameters"]["removed_fraction"] < 0.03
    assert report["recovery"]["steps"] == 2 and report["quality"]["after_recovery"] is not None
    assert report["onnx"]["max_abs_difference"] < 1e-3 and (out / "model.onnx").exists()
    assert set(report["speed"]["before"]["throughput"]) == {"1", "2"}
    assert "calibration" in report["protocol"] and "Data protocol" in (out / "report.md").read_text()
    for name in ("recipe.yaml", "prunekit_structure.json", "tokenizer.json", "config.json", "widths.png"):
        assert (out / name).exists(), name
    import prunekit

    model = prunekit.load(out)
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == report["parameters"]["after"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["importance"]["name"] == "fisher" and recipe["ratio"] == 0.02 and recipe["reconstruct"] is True
    assert recipe["reconstruct_damping"] == 0.3 and recipe["recovery"]["train_only"] == ["mlp.", "norm"]
    assert "reconstruction refitted" in json.dumps(report["width"])
    again = tmp_path / "again"
    memory = report["memory"]["inference"]
    for when in ("before", "after"):  # each model alone in a fresh process, at the largest timed batch
        assert memory[when]["batch"] == 2 and memory[when]["peak_rss_bytes"] >= memory[when]["loaded_rss_bytes"] > 0
    assert "fresh Python process" in memory["protocol"] and "fresh process" in (out / "report.md").read_text()
    assert main(["shrink", "--recipe", str(out / "recipe.yaml"), "--out", str(again), "--no-recover", "--no-onnx",
                 "--no-peak-memory"]) == 0
    second = json.loads((again / "report.json").read_text())
    assert second["width"]["plan"]["widths"] == report["width"]["plan"]["widths"]  # seeded: the same choices
    capsys.readouterr()
    assert main(["shrink-graph", str(tiny_dir), "--json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert {f["kind"] for f in graph["families"]} == {"channels", "heads", "hidden"}


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["--ratio", "0"], "nothing to prune"),
    (["--ratio", "0.9"], "cannot be reached: with every family at its floor"),
    (["--importance", "obs"], "unknown importance criterion 'obs'"),
    (["--heads", "some"], "heads: Input should be 'kv' or 'query'"),
    (["--granularity", "layers"], "unknown granularity 'layers'"),
    (["--override", "model.layers.0.mlp=1.0"], "override for 'model.layers.0.mlp' must be in [0, 1)"),
    (["--override", "nowhere*=0.5"], "override pattern 'nowhere*' matches no prunable family"),
    (["--depth", "5", "--ratio", "0"], "cannot remove 5 of 2 blocks; keep at least one"),
    (["--depth", "1", "--ratio", "0", "--depth-criterion", "search", "--depth-search", "uniform"],
     "allocation uniform does not measure the model"),
    (["--depth", "1", "--ratio", "0", "--depth-criterion", "search", "--depth-search", "annealing"],
     "unknown allocation 'annealing'"),
    (["--floor", "2"], "floor: Input should be less than or equal to 1"),
    (["--reconstruct", "--reconstruct-damping", "0"], "reconstruct_damping: Input should be greater than 0"),
    (["--ignore", "model.*"], "nothing to prune: no family of the chosen granularities is left"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dir, tmp_path, capsys, extra, message):
    before = _fingerprint(tiny_dir)
    out = tmp_path / "bad"
    code = main(_args(tiny_dir, out, *extra))
    error = capsys.readouterr().err
    assert code == 2 and message in " ".join(error.split()), error
    assert "Traceback" not in error and not out.exists()
    assert not list(tmp_path.glob(".bad.tmp-*"))
    assert _fingerprint(tiny_dir) == before


def test_depth_search_removes_the_blocks_its_recipe_names_again(tiny_dir, tmp_path, capsys):
    out = tmp_path / "deeper"
    code = main(_args(tiny_dir, out, "--ratio", "0", "--depth", "1", "--depth-criterion", "search",
                      "--depth-search", "knapsack", "--no-peak-memory"))
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    depth = report["depth"]
    assert depth["criterion"] == "search" and len(depth["removed"]) == 1
    # knapsack on blocks: the block whose skipping alone costs the least KL is the one removed
    assert depth["removed"] == [min(range(len(depth["scores"])), key=lambda i: depth["scores"][i])]
    again = tmp_path / "again"
    assert main(_args(tiny_dir, again, "--recipe", str(out / "recipe.yaml"))) == 0
    assert json.loads((again / "report.json").read_text())["depth"]["removed"] == depth["removed"]


def test_outputs_are_not_overwritten_and_bad_files_are_named(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_args(tiny_dir, out, "--ratio", "0.02")) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ratio: [unclosed")
    assert main(["shrink", "--recipe", str(recipe), "--out", str(tmp_path / "r")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    recipe.write_text("ratio: 0.2\nunknown_key: 3\n")
    assert main(["shrink", "--recipe", str(recipe), "--out", str(tmp_path / "r")]) == 2
    assert "unknown_key: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["shrink", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(_args(tiny_dir, tiny_dir / "inside", "--ratio", "0.02")) == 2
    assert "lies inside the input" in capsys.readouterr().err


def test_unknown_operations_fail_unless_lenient(tiny_dir, tmp_path, capsys, monkeypatch):
    from prunekit.structure import trace

    monkeypatch.setattr(trace, "_UNARY", trace._UNARY - {"silu"})  # the tracer no longer knows the MLP's activation
    strict = tmp_path / "strict"
    assert main(_args(tiny_dir, strict, "--ratio", "0.001", "--no-eval", "--no-peak-memory")) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "cannot follow channels through the operation 'silu' in module 'model.layers.0.mlp.act_fn'" in error
    assert "--lenient" in error and "Traceback" not in error and not strict.exists()
    assert main(["shrink-graph", str(tiny_dir), "--lenient", "--json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert any("'silu'" in note and "left unpruned" in note for note in graph["notes"])
    assert not any(f["name"].endswith(".mlp") for f in graph["families"])  # frozen around the unknown op
    lenient = tmp_path / "lenient"
    assert main(_args(tiny_dir, lenient, "--ratio", "0.001", "--lenient", "--no-eval", "--no-peak-memory")) == 0
    report = json.loads((lenient / "report.json").read_text())
    assert report["settings"]["lenient"] is True and report["parameters"]["removed_fraction"] > 0
    assert any("'silu'" in note for note in report["width"]["notes"])
    assert report["memory"]["inference"]["before"] is None

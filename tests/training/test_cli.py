"""``prunekit train``: the Fashion-MNIST job end to end, its report, and bad input."""

import json

import pytest
from safetensors.torch import load_file

from prunekit.cli import main

BASE = ["train", "fashion-mnist", "--model", "mlp", "--epochs", "2", "--train-limit", "4000", "--test-limit", "1000",
        "--batch-size", "100"]


def test_rigl_run_writes_model_report_and_plots(tmp_path, capsys, fashion_small):
    out = tmp_path / "rigl"
    code = main(BASE + ["--method", "rigl", "--ratio", "0.9", "--allocation", "erk", "--out", str(out),
                        "--method-arg", "update_interval=4"])
    assert code == 0
    for name in ("model.safetensors", "report.json", "report.md", "sparsity_over_training.png", "training.png",
                 "recipe.yaml"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["method"]["name"] == "rigl" and report["method"]["update_interval"] == 4
    assert report["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-3)
    assert report["test_accuracy"] > 0.6
    state = load_file(str(out / "model.safetensors"))
    assert not any("parametrizations" in key for key in state)
    for layer in report["layers"]:
        weight = state[f"{layer['name']}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(layer["sparsity"], abs=1e-6)
        assert layer["sparse_flops"] == pytest.approx(layer["dense_flops"] * (1 - layer["sparsity"]))
    flops = report["flops"]
    assert flops["dense"] == 2 * (784 * 300 + 300 * 100 + 100 * 10)  # FlopCounterMode: 2 per multiply-add
    updates = [r for r in report["sparsity_history"] if r["event"].startswith("drop and grow")]
    assert updates and all(r["sparsity"] == pytest.approx(0.9, abs=1e-3) for r in updates)
    assert "## Per-layer sparsity and FLOPs" in (out / "report.md").read_text()
    assert "test accuracy" in capsys.readouterr().out


def test_lottery_run_reports_every_round(tmp_path, fashion_small):
    out = tmp_path / "lth"
    assert main(BASE + ["--method", "lottery", "--ratio", "0.8", "--out", str(out),
                        "--method-arg", "schedule=[0.5,0.8]"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [round(r["sparsity"], 2) for r in report["training"]["rounds"]] == [0.0, 0.5, 0.8]
    assert len(report["training"]["epochs"]) == 6  # 2 epochs a round, three rounds


@pytest.mark.parametrize("args, message", [
    (["--method", "rigl", "--ratio", "1.5"], "ratio must be in \\[0, 1\\)"),
    (["--method", "gmp", "--method-arg", "start_step=30", "--method-arg", "end_step=10"], "ends \\(step 10\\) before it starts"),
    (["--method", "rigl", "--method-arg", "update_interval=0"], "update_interval: Input should be greater than or equal to 1"),
    (["--method", "wizard"], "unknown method 'wizard'"),
    (["--method", "rigl", "--allocation", "owl"], "needs calibration activations"),
    (["--method", "magnitude", "--method-arg", "flavour=1"], "magnitude has no setting 'flavour'"),
    (["--method", "rigl", "--epochs", "0"], "epochs"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message, fashion_small):
    out = tmp_path / "out"
    assert main(BASE + args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, " ".join(err.split())), err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert main(BASE + ["--method", "dense", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_methods_lists_every_method(capsys):
    assert main(["train", "methods"]) == 0
    text = capsys.readouterr().out
    for name in ("gmp", "channel_gmp", "lottery", "snip", "grasp", "synflow", "random", "set", "rigl", "granet"):
        assert name in text
    assert "erk" in text and "lamp" in text


def test_recover_refuses_a_dense_model(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "rec"
    assert main(["train", "recover", str(tiny_model_dir), "--out", str(out), "--steps", "1",
                 "--train-seq-len", "16", "--test-windows", "1"]) == 2
    assert "no pruned weights" in capsys.readouterr().err
    assert not out.exists()

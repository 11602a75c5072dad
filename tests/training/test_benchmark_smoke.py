"""The sparse-training benchmark's smoke version (the full grid runs by hand)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse_training.py"


def test_smoke_grid_runs_resumes_and_reports(tmp_path, fashion_small):
    spec = importlib.util.spec_from_file_location("sparse_training_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    first = bench.smoke(tmp_path)
    labels = sorted(r["label"] for r in first["runs"])
    assert labels == ["RigL", "dense", "lottery mask, random re-init", "lottery ticket (rewound)"]
    for run in first["runs"]:
        if run["label"] != "dense":
            assert run["achieved"] == pytest.approx(0.9, abs=1e-3)
        assert 0.0 <= run["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "sparse_training_mlp.json").read_text())
    assert len(saved["runs"]) == 4
    again = bench.smoke(tmp_path)  # everything is measured already: nothing reruns
    assert again["runs"] == first["runs"]
    assert "| RigL | " in first["markdown"] and "Dense: " in first["markdown"]

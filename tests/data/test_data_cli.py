"""``prunekit data`` end to end: outputs equal the selected input rows, bad input leaves nothing behind,
and two gloo processes under torchrun give the same scores as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prunekit.cli import main

FAST = ["--epochs", "2", "--seeds", "2", "--cnn-width", "8", "--batch-size", "64"]


def indices(folder: Path) -> list[int]:
    return [int(line) for line in (folder / "indices.txt").read_text().split()]


def test_prune_a_jsonl_file_end_to_end(jsonl_file, tmp_path, digest):
    before = digest(jsonl_file)
    out = tmp_path / "pruned"
    code = main(["data", "prune", str(jsonl_file), "-s", "el2n", "-s", "prototypes", "--ratio", "0.5",
                 "--balance", "proportional", "--epochs", "3", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "indices.txt", "recipe.yaml", "report.json",
                                                     "report.md", "scores.csv", "scores.json", "selection.json"]
    kept = indices(out)
    assert len(kept) == 9
    lines = [line for line in jsonl_file.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    assert (out / "data.jsonl").read_text(encoding="utf-8") == "".join(lines[i] for i in kept)
    labels = [json.loads(lines[i])["label"] for i in kept]
    assert sorted(labels) == ["money"] * 4 + ["sport"] * 5 or sorted(labels) == ["money"] * 5 + ["sport"] * 4
    scores = (out / "scores.csv").read_text().splitlines()
    assert scores[0] == "index,label,el2n,prototypes" and scores[1].split(",")[:2] == ["0", "sport"]
    selection = json.loads((out / "selection.json").read_text())
    assert selection["score"] == "el2n" and selection["kept"] == 9
    assert "Spearman" in (out / "report.md").read_text()
    assert digest(jsonl_file) == before


def test_score_then_select_arrays_with_class_balance(tmp_path):
    scores_dir, chosen = tmp_path / "scores", tmp_path / "chosen"
    assert main(["data", "score", "fashion-mnist", "--limit", "300", "-s", "forgetting", "-s", "aum", *FAST,
                 "--out", str(scores_dir)]) == 0
    meta = json.loads((scores_dir / "scores.json").read_text())
    assert meta["proxy"]["epochs_trained"] == 2 and meta["proxy"]["seeds_run"] == [0, 1]
    assert main(["data", "select", str(scores_dir), "-s", "aum", "--count", "90", "--strategy", "ccs",
                 "--strategy-arg", "hard_cut=0.05", "--balance", "proportional", "--data", "fashion-mnist",
                 "--limit", "300", "--out", str(chosen)]) == 0
    kept = indices(chosen)
    from prunekit.models.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("train", 300)
    with np.load(chosen / "data.npz") as archive:
        assert np.array_equal(archive["images"], data.images.numpy()[kept])
        assert np.array_equal(archive["labels"], data.labels.numpy()[kept])
    expected = {int(c): round(90 * int((data.labels == c).sum()) / 300) for c in range(10)}
    got = {int(c): int((data.labels.numpy()[kept] == c).sum()) for c in range(10)}
    assert sum(got.values()) == 90 and all(abs(got[c] - expected[c]) <= 1 for c in range(10))


def _fails(args: list[str], capsys, message: str) -> None:
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, jsonl_file, digest):
    out = tmp_path / "out"
    unlabelled = tmp_path / "plain.txt"
    unlabelled.write_text("one example\nanother example\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    before = digest(jsonl_file)
    _fails(["data", "prune", str(jsonl_file), "-s", "random", "--ratio", "1.5", "--out", str(out)], capsys, "less than 1")
    _fails(["data", "prune", str(jsonl_file), "-s", "random", "--ratio", "-0.1", "--out", str(out)], capsys, "greater than or equal to 0")
    _fails(["data", "score", str(unlabelled), "-s", "el2n", "--out", str(out)], capsys, "needs labels")
    _fails(["data", "score", str(unlabelled), "-s", "confidence", "--out", str(out)], capsys, "trains a proxy model")
    _fails(["data", "score", str(empty), "-s", "random", "--out", str(out)], capsys, "is empty")
    _fails(["data", "score", str(tmp_path / "nope.csv"), "-s", "random", "--out", str(out)], capsys, "no such file")
    _fails(["data", "score", str(jsonl_file), "-s", "el3n", "--out", str(out)], capsys, "unknown data score 'el3n'")
    _fails(["data", "score", str(jsonl_file), "-s", "el2n", "--score-arg", "el2n.epochs=2", "--out", str(out)],
           capsys, "data score el2n has no setting 'epochs'; its settings are: epoch")
    _fails(["data", "score", str(jsonl_file), "-s", "el2n", "--score-arg", "aum.x=2", "--out", str(out)],
           capsys, "which is not among: el2n")
    _fails(["data", "prune", str(jsonl_file), "-s", "random", "--ratio", "0.5", "--strategy", "best", "--out", str(out)],
           capsys, "unknown selection strategy")
    _fails(["data", "score", str(jsonl_file), "-s", "random", "--out", str(jsonl_file)], capsys, "input itself")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert digest(jsonl_file) == before


def test_scores_applied_to_other_data_are_refused(tmp_path, capsys, jsonl_file, csv_file):
    scores = tmp_path / "scores"
    assert main(["data", "score", str(jsonl_file), "-s", "random", "--out", str(scores)]) == 0
    out = tmp_path / "out"
    _fails(["data", "select", str(scores), "--ratio", "0.5", "--data", "fashion-mnist", "--limit", "20",
            "--out", str(out)], capsys, "computed on other data")
    _fails(["data", "select", str(scores), "--ratio", "0.5", "--data", str(csv_file), "--out", str(out)],
           capsys, "differs from the data the scores were computed on")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    _fails(["data", "select", str(nothing), "--ratio", "0.5", "--out", str(out)], capsys, "no scores at")
    assert not out.exists()
    # the output must not clobber existing results
    assert main(["data", "select", str(scores), "--ratio", "0.5", "--out", str(out)]) == 0
    _fails(["data", "select", str(scores), "--ratio", "0.5", "--out", str(out)], capsys, "--overwrite")
    assert main(["data", "select", str(scores), "--ratio", "0.75", "--out", str(out), "--overwrite"]) == 0
    assert len(indices(out)) == 5  # round(0.25 * 18 = 4.5) rounds half up


def test_corrupt_scores_files_are_refused(tmp_path, capsys):
    folder = tmp_path / "scores"
    folder.mkdir()
    (folder / "scores.csv").write_text("index,label,s\n0,,1.0\n2,,oops\n")
    _fails(["data", "select", str(folder), "--ratio", "0.5", "--out", str(tmp_path / "o")], capsys, "expected 1")
    (folder / "scores.csv").write_text("index,label,s\n0,,1.0\n1,,oops\n")
    _fails(["data", "select", str(folder), "--ratio", "0.5", "--out", str(tmp_path / "o")], capsys, "is not a number")


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "prunekit", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path, tiny_model_dir):
    """Seeds and batches shared out between two torchrun processes: scores.csv is byte-identical."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} about " + "things " * (i % 7)}) + "\n"
                             for i in range(22)))
    jobs = {
        "images": ["fashion-mnist", "--limit", "240", "-s", "el2n", "-s", "forgetting", "-s", "aum", "-s", "prototypes",
                   "-s", "random", *FAST],
        "text": [str(texts), "-s", "perplexity", "--score-arg", f"perplexity.model={tiny_model_dir}",
                 "--score-arg", "perplexity.batch_size=4"],
    }
    for name, args in jobs.items():
        one, two = tmp_path / f"{name}-one", tmp_path / f"{name}-two"
        assert main(["data", "score", *args, "--threads", "1", "--out", str(one)]) == 0
        result = _torchrun(["data", "score", *args, "--threads", "1", "--out", str(two)], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (two / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes(), name
        meta = json.loads((two / "scores.json").read_text())
        assert meta["processes"] == 2 and meta["threads_per_process"] == 1

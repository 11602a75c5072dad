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


MALFORMED = {
    "broken.jsonl": '{"text": "fine", "label": 1}\n{"text": "cut", "label": 2\n{"text": "more", "label": 1}\n',
    "ragged.csv": "a,b,label\n1,2,0\n3,4,1\n5,6,7,8\n",
    "fraction.csv": "a,b,label\n1,2,0\n3,4,0.5\n",
}


def test_malformed_files_are_exactly_one_line(tmp_path):
    """The datasets readers log each parse error before raising it; that copy used to print a second line
    before prunekit's. A fresh process, so that datasets' own log handler writes to the real stderr."""
    for name, content in MALFORMED.items():
        (tmp_path / name).write_text(content)
    script = ("import sys\nfrom prunekit.cli import main\n"
              "for name in sys.argv[1:]:\n"
              "    code = main(['data', 'score', name, '-s', 'random', '--out', name + '.out'])\n"
              "    print(f'== {name} {code}', file=sys.stderr, flush=True)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PRUNEKIT_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", script, *MALFORMED], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed, lines = {}, []
    for line in done.stderr.splitlines():
        if line.startswith("== "):
            _, name, code = line.split()
            printed[name] = (int(code), lines)
            lines = []
        elif line.strip():
            lines.append(line)
    assert printed["broken.jsonl"] == (2, ["error: cannot read broken.jsonl: JSON parse error: Missing a comma or "
                                           "'}' after an object member. in row 1"]), done.stderr
    assert printed["ragged.csv"] == (2, ["error: cannot read ragged.csv: Error tokenizing data. C error: Expected 3 "
                                         "fields in line 4, saw 4"]), done.stderr
    assert printed["fraction.csv"] == (2, ["error: fraction.csv row 1: label 0.5 is not a class (labels must be "
                                           "integers or strings)"]), done.stderr
    assert not list(tmp_path.glob("*.out"))


def test_limit_is_honoured_for_a_data_file(tmp_path, jsonl_file, capsys):
    """--limit used to be read only for Fashion-MNIST: a file was scored and pruned whole."""
    out, chosen = tmp_path / "pruned", tmp_path / "chosen"
    assert main(["data", "prune", str(jsonl_file), "-s", "random", "--ratio", "0.5", "--limit", "6",
                 "--out", str(out)]) == 0
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 6 and [int(line.split(",")[0]) for line in scores[1:]] == list(range(6))
    kept = indices(out)
    assert len(kept) == 3 and max(kept) < 6
    lines = [line for line in jsonl_file.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    assert (out / "data.jsonl").read_text(encoding="utf-8") == "".join(lines[i] for i in kept)
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["reading"]["limit"] == 6
    # scores of the first 6 rows are applied to the first 6 rows only
    _fails(["data", "select", str(out), "--ratio", "0.5", "--data", str(jsonl_file), "--out", str(chosen)],
           capsys, "computed on other data")
    assert main(["data", "select", str(out), "--ratio", "0.5", "--data", str(jsonl_file), "--limit", "6",
                 "--out", str(chosen)]) == 0
    assert (chosen / "data.jsonl").read_text(encoding="utf-8") == (out / "data.jsonl").read_text(encoding="utf-8")


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

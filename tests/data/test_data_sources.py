"""Readers and writers: every input kind, rows written back equal to the selected input rows, bad files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from prunekit.data import open_data
from prunekit.data.sources import FileSource, TensorSource
from prunekit.errors import PrunekitError

PICK = np.array([0, 3, 4, 10, 17])


def read_back(path, **options):
    return list(FileSource(path, **options).rows())


def test_jsonl_rows_are_written_byte_for_byte(jsonl_file, tmp_path, digest):
    before = digest(jsonl_file)
    source = open_data(jsonl_file)
    assert source.modality == "text" and len(source) == 18 and source.label_field == "label"
    assert source.classes() == ["money", "sport"] and source.labels()[0] == 1
    out = tmp_path / "out"
    out.mkdir()
    written = source.write_subset(PICK, out)
    original = [line for line in jsonl_file.read_bytes().splitlines(keepends=True) if line.strip()]
    assert written.read_bytes() == b"".join(original[i] for i in PICK)
    assert read_back(written) == [list(source.rows())[i] for i in PICK]
    assert digest(jsonl_file) == before


def test_csv_cells_round_trip_as_text(csv_file, tmp_path):
    source = open_data(csv_file)
    rows = list(source.rows())
    assert rows[7]["id"] == "007"  # no type guessing: zero-padded ids survive
    out = tmp_path / "out"
    out.mkdir()
    written = source.write_subset(PICK, out)
    with open(written, newline="", encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    with open(csv_file, newline="", encoding="utf-8") as handle:
        original = list(csv.DictReader(handle))
    assert back == [original[i] for i in PICK]


def test_parquet_rows_and_types_survive_across_row_groups(parquet_file, tmp_path):
    import pyarrow.parquet as pq

    source = open_data(parquet_file)
    out = tmp_path / "out"
    out.mkdir()
    pick = np.array([1, 4, 5, 9, 10, 16])  # crosses row groups of 5
    written = source.write_subset(pick, out)
    original = pq.read_table(parquet_file)
    assert pq.read_table(written).equals(original.take(pick))


def test_plain_text_lines_and_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\nsecond line\nthird line\n\n\n\nfourth\n")
    lines = open_data(path)
    assert [r["text"] for r in lines.rows()] == ["first line", "second line", "third line", "fourth"]
    paragraphs = open_data(path, text_unit="paragraph")
    assert [r["text"] for r in paragraphs.rows()] == ["first line", "second line\nthird line", "fourth"]
    out = tmp_path / "out"
    out.mkdir()
    assert paragraphs.write_subset(np.array([1, 2]), out).read_text() == "second line\nthird line\n\nfourth\n"
    assert list(paragraphs.text_batches(2)) == [["first line", "second line\nthird line"], ["fourth"]]


def test_tabular_csv_uses_numeric_columns(tabular_csv):
    source = open_data(tabular_csv)
    assert source.modality == "tabular" and source.feature_fields == ["f1", "f2", "f3", "f4"]
    assert source.inputs().shape == (120, 4) and source.classes() == ["a", "b"]
    chosen = open_data(tabular_csv, features=["f1", "f3"])
    assert chosen.inputs().shape == (120, 2)


def test_arrays_tensors_and_array_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(12, 5, 5), dtype=np.uint8)
    labels = np.arange(12) % 3
    source = open_data(images, labels)
    assert source.modality == "image" and source.inputs().shape == (12, 1, 5, 5)
    assert float(source.inputs().max()) <= 1.0  # 8-bit images are scaled to [0, 1]
    x, y = source.subset(np.array([2, 5]))
    assert np.array_equal(x, images[[2, 5]]) and np.array_equal(y, labels[[2, 5]])
    path = tmp_path / "set.npz"
    np.savez(path, x=images, y=labels, names=np.array(["a", "b", "c"]))
    from_file = open_data(path)
    out = tmp_path / "out"
    out.mkdir()
    written = from_file.write_subset(np.array([1, 7]), out)
    with np.load(written) as archive:
        assert np.array_equal(archive["x"], images[[1, 7]]) and np.array_equal(archive["y"], labels[[1, 7]])
        assert archive["names"].tolist() == ["a", "b", "c"]  # arrays of another length are copied whole
    pt = tmp_path / "set.pt"
    torch.save({"inputs": torch.randn(6, 3), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}, pt)
    assert open_data(pt).modality == "tabular" and len(open_data(pt)) == 6


def test_torch_and_hf_datasets():
    import datasets
    from torch.utils.data import Dataset, Subset

    class Pairs(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((2, 4, 4), float(i)), i % 2

    source = open_data(Pairs())
    assert source.modality == "image" and source.labels().tolist() == [0, 1] * 4
    assert isinstance(source.subset(np.array([1, 2])), Subset)
    hf = datasets.Dataset.from_dict({"text": ["a cat", "a dog", "a car"], "label": [0, 1, 1]})
    hf_source = open_data(hf)
    assert hf_source.modality == "text" and hf_source.labels().tolist() == [0, 1, 1]
    assert hf_source.subset(np.array([2]))["text"] == ["a car"]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("text,label\n", "has no rows"),
    ("\n\n\n", "has no rows"),
])
def test_empty_files_are_refused(tmp_path, content, message):
    path = tmp_path / ("data.csv" if "text," in content else "data.txt")
    path.write_text(content)
    with pytest.raises(PrunekitError, match=message):
        len(open_data(path))


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(PrunekitError, match="no such file"):
        open_data(tmp_path / "missing.jsonl")
    with pytest.raises(PrunekitError, match="is a directory"):
        open_data(tmp_path)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(PrunekitError, match="unknown file type"):
        open_data(odd)
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\xff\xfe\x00bad\xc3\x28\n" * 10)
    with pytest.raises(PrunekitError, match="cannot read"):
        len(open_data(binary))
    broken = tmp_path / "data.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(PrunekitError, match="cannot read"):
        len(open_data(broken))
    corrupt = tmp_path / "data.npz"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(PrunekitError, match="cannot read"):
        open_data(corrupt)
    pickled = tmp_path / "data.pt"
    torch.save({"inputs": torch.zeros(2, 2), "model": object()}, pickled)
    with pytest.raises(PrunekitError, match="cannot read"):
        open_data(pickled)  # weights_only refuses arbitrary pickles


def test_column_problems_name_the_column(tmp_path, jsonl_file):
    with pytest.raises(PrunekitError, match="no text column 'body'"):
        open_data(jsonl_file, text_field="body")
    with pytest.raises(PrunekitError, match="no label column 'class'"):
        open_data(jsonl_file, label_field="class")
    missing = tmp_path / "missing_label.jsonl"
    missing.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(PrunekitError, match="row 1.*no label"):
        open_data(missing).labels()
    fractional = tmp_path / "fraction.jsonl"
    fractional.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2.5}\n')
    with pytest.raises(PrunekitError, match="not a class"):
        open_data(fractional).labels()
    words = tmp_path / "words.csv"
    words.write_text("a,b\n1,x\n2,3\n")
    with pytest.raises(PrunekitError, match="no text column"):
        open_data(words)
    with pytest.raises(PrunekitError, match="'x', not a number"):
        open_data(words, features=["a", "b"]).inputs()


def test_in_memory_mismatches():
    with pytest.raises(PrunekitError, match="10 inputs but 9 labels"):
        TensorSource(np.zeros((10, 3)), np.zeros(9))
    with pytest.raises(PrunekitError, match="NaN"):
        TensorSource(np.full((4, 3), np.nan))
    with pytest.raises(PrunekitError, match="shape"):
        TensorSource(np.zeros(10))
    with pytest.raises(PrunekitError, match="is empty"):
        open_data(["", "text"])


def test_text_files_are_streamed_not_loaded(tmp_path):
    """Batches come while the file is still being read: the reader is a lazy stream."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for i in range(5000):
            handle.write(json.dumps({"text": f"row {i}"}) + "\n")
    source = open_data(path)
    batches = source.text_batches(16)
    first = next(batches)
    assert first[0] == "row 0" and len(first) == 16
    import datasets

    assert isinstance(source._load(), datasets.IterableDataset)


# ------------------------------------------------------------------ issue 16, item 11: labels and --limit

def test_csv_labels_that_are_fractions_or_blank_are_refused(tmp_path):
    """CSV cells are read as text; a number in a label cell must still be a whole one (as in JSON Lines)."""
    fractional = tmp_path / "fraction.csv"
    fractional.write_text("a,b,label\n1,2,0\n3,4,1.5\n")
    with pytest.raises(PrunekitError, match=r"row 1: label 1.5 is not a class"):
        open_data(fractional).labels()
    blank = tmp_path / "blank.csv"
    blank.write_text("a,b,label\n1,2,0\n3,4,\n")
    with pytest.raises(PrunekitError, match=r"row 1: a row has no label"):
        open_data(blank).labels()
    words = tmp_path / "words.csv"
    words.write_text("a,b,label\n1,2,cat\n3,4,2.0\n5,6,007\n")
    assert open_data(words).classes() == ["007", "2.0", "cat"]  # whole numbers and words stay classes as written


def _pairs_dataset(rows: int):
    from torch.utils.data import Dataset

    class Pairs(Dataset):
        def __len__(self):
            return rows

        def __getitem__(self, i):
            return torch.full((2, 4, 4), float(i)), i % 3

    return Pairs()


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tabular csv", "parquet", "txt", "npz", "pt", "tensors",
                                  "texts", "torch dataset", "datasets"])
def test_limit_reads_only_the_first_rows_of_every_source(kind, tmp_path, jsonl_file, csv_file, tabular_csv,
                                                         parquet_file):
    """``limit`` used to be honoured for Fashion-MNIST only and silently ignored for everything else."""
    import datasets

    images = np.arange(20 * 3 * 3, dtype=np.float32).reshape(20, 3, 3)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    torch.save({"inputs": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, tmp_path / "set.pt")
    (tmp_path / "lines.txt").write_text("".join(f"line {i}\n" for i in range(20)))
    texts = [f"text {i}" for i in range(20)]
    data = {"jsonl": jsonl_file, "csv": csv_file, "tabular csv": tabular_csv, "parquet": parquet_file,
            "txt": tmp_path / "lines.txt", "npz": tmp_path / "set.npz", "pt": tmp_path / "set.pt",
            "tensors": (torch.from_numpy(images), torch.from_numpy(labels)), "texts": (texts, list(labels)),
            "torch dataset": _pairs_dataset(20),
            "datasets": datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()})}[kind]
    whole, first = open_data(data), open_data(data, limit=7)
    assert len(whole) > 7 and len(first) == 7
    if first.labels() is not None:
        assert first.labels().tolist() == whole.labels()[:7].tolist() or first.label_values() == \
            whole.label_values()[:7]
    if first.modality == "text":
        assert sum(list(first.text_batches(3)), []) == sum(list(whole.text_batches(3)), [])[:7]
    else:
        assert torch.equal(first.inputs(), whole.inputs()[:7])
    assert "first 7" in first.description
    out = tmp_path / "out"
    out.mkdir()
    written = first.write_subset(np.array([0, 2, 6]), out)
    assert len(open_data(written)) == 3
    assert len(open_data(data, limit=len(whole) + 5)) == len(whole)  # a limit above the size reads all


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_1_is_refused(limit, jsonl_file):
    with pytest.raises(PrunekitError, match=f"--limit must be at least 1, got {limit}"):
        open_data(jsonl_file, limit=limit)


def test_limited_jsonl_rows_are_the_first_lines_byte_for_byte(jsonl_file, tmp_path):
    source = open_data(jsonl_file, limit=5)
    out = tmp_path / "out"
    out.mkdir()
    written = source.write_subset(np.array([1, 4]), out)
    original = [line for line in jsonl_file.read_bytes().splitlines(keepends=True) if line.strip()]
    assert written.read_bytes() == original[1] + original[4]

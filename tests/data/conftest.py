"""Fixtures for the data-pruning tests: a small real Fashion-MNIST subset and small files in every format."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fmnist_small():
    """The first 800 Fashion-MNIST training images (real data, all ten classes)."""
    from prunekit.models.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("train", 800)
    return data.images, data.labels


@pytest.fixture()
def text_rows():
    """Labelled text rows with some awkward values (commas, quotes, newlines, unicode, zero-padded ids)."""
    rows = []
    topics = {"sport": ["The team won the match", "A late goal decided the final", "The runner broke the record"],
              "money": ["Shares fell on the stock market", "The central bank raised rates", "Bond yields rose again"]}
    number = 0
    for label, sentences in topics.items():
        for sentence in sentences:
            for variant in range(3):
                rows.append({"text": f"{sentence}, said \"report\" {variant} — café\nline two", "label": label,
                             "id": f"{number:03d}"})
                number += 1
    return rows


@pytest.fixture()
def jsonl_file(tmp_path, text_rows):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in text_rows]
    lines.insert(4, "")  # a blank line is not a row
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def csv_file(tmp_path, text_rows):
    import csv

    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "id"])
        writer.writeheader()
        writer.writerows(text_rows)
    return path


@pytest.fixture()
def tabular_csv(tmp_path):
    """Two Gaussian blobs in 4 features, labels a/b."""
    rng = np.random.default_rng(0)
    path = tmp_path / "table.csv"
    lines = ["f1,f2,f3,f4,label"]
    for i in range(120):
        label = i % 2
        x = rng.normal(loc=2.0 * label, size=4)
        lines.append(",".join(f"{v:.6f}" for v in x) + f",{'ab'[label]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def parquet_file(tmp_path, text_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    table = pa.Table.from_pylist([{**r, "weight": float(i) / 3} for i, r in enumerate(text_rows)])
    pq.write_table(table, path, row_group_size=5)  # several row groups: writing must cross their borders
    return path


@pytest.fixture()
def digest():
    import hashlib

    def of(path) -> str:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    return of

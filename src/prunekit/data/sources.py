"""The user's training data, whatever its form, seen the same way by every score and writer.

A :class:`DataSource` has a fixed row order (row ``i`` is example ``i`` in every file prunekit
writes), a modality (``image``, ``tabular`` or ``text``), optional class labels, and can write
any subset of its rows in its own format. Sources:

* in-memory tensors or numpy arrays (``TensorSource``) and lists of strings (``TextListSource``);
* any map-style ``torch.utils.data.Dataset`` (materialised once into tensors or strings);
* Hugging Face ``datasets`` objects, and local ``.jsonl``/``.csv``/``.tsv``/``.parquet``/``.txt``
  files read offline by ``datasets`` in streaming mode (``FileSource``): text is never loaded whole,
  every pass re-reads the file;
* ``.npz``/``.pt``/``.safetensors`` array files, and the built-in ``fashion-mnist``.

``limit=N`` reads only the first N examples of any of them. The input is never modified: writers
create new files only.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError

IMAGE, TABULAR, TEXT = "image", "tabular", "text"
FILE_FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
ARRAY_FORMATS = (".npz", ".pt", ".pth", ".safetensors")
INPUT_KEYS = ("inputs", "x", "images", "features", "data")
LABEL_KEYS = ("labels", "y", "targets", "label")
BUILTIN = "fashion-mnist"
_HASH_CHUNK = 1 << 22


class DataSource(ABC):
    """Training examples in a fixed order, with optional class labels."""

    modality: str
    description: str

    @abstractmethod
    def __len__(self) -> int: ...

    def label_values(self) -> list | None:
        """The label of every row as given (strings, integers), or None for unlabelled data."""
        return None

    def labels(self) -> np.ndarray | None:
        """Class ids 0..C-1 of every row (classes in sorted order of their values), or None."""
        values = self.label_values()
        if values is None:
            return None
        ids, _ = encode_labels(values, self.description)
        return ids

    def classes(self) -> list | None:
        values = self.label_values()
        return None if values is None else encode_labels(values, self.description)[1]

    def inputs(self) -> torch.Tensor:
        """All inputs as one float tensor (images (N, C, H, W) or features (N, F)) for proxy training."""
        raise PrunekitError(f"{self.description} holds text; it has no numeric inputs")

    def text_batches(self, batch_size: int) -> Iterator[list[str]]:
        """Consecutive batches of texts in row order (streamed where the source allows)."""
        raise PrunekitError(f"{self.description} holds {self.modality} data, not text")

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies these rows, stored with the scores to catch scores applied to other data."""

    @abstractmethod
    def subset(self, indices: np.ndarray) -> Any:
        """The selected rows as an in-memory object of the input's kind."""

    @abstractmethod
    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        """Write the selected rows (ascending order) in the input's own format into ``folder``."""

    def info(self) -> dict[str, Any]:
        labels = self.labels()
        return {"description": self.description, "modality": self.modality, "rows": len(self),
                "labelled": labels is not None,
                "classes": None if labels is None else [str(c) for c in (self.classes() or [])]}


# ---------------------------------------------------------------------------------------------
# labels


def _plain_label(value: Any, where: str) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise PrunekitError(f"{where}: a label must be one value, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise PrunekitError(f"{where}: a row has no label")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise PrunekitError(f"{where}: label {value} is not a class (labels must be integers or strings)")
        return int(value)
    if isinstance(value, str) and not value.strip():
        raise PrunekitError(f"{where}: a row has no label")
    if isinstance(value, (int, str)):
        return value
    raise PrunekitError(f"{where}: label {value!r} is not a class (labels must be integers or strings)")


def _text_label(value: Any, where: str) -> Any:
    """A label read as text (a CSV cell): a number in it must be a whole one, as in every other format."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not number.is_integer():
            raise PrunekitError(f"{where}: label {value.strip()} is not a class (labels must be integers or strings)")
    return _plain_label(value, where)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PrunekitError(f"--limit must be at least 1, got {limit}")


def _first(value: Any, limit: int | None) -> Any:
    """The first ``limit`` rows of an array, tensor or sequence (all of them when ``limit`` is None)."""
    return value if limit is None or value is None else value[:limit]


def _limited(description: str, limit: int | None) -> str:
    return description + (f" (first {limit})" if limit else "")


def encode_labels(values: Sequence[Any], where: str) -> tuple[np.ndarray, list]:
    """Map label values to ids 0..C-1 in the sorted order of the distinct values."""
    plain = [_plain_label(v, where) for v in values]
    kinds = {type(v) for v in plain}
    if len(kinds) > 1:
        raise PrunekitError(f"{where}: labels mix numbers and strings; use one kind")
    classes = sorted(set(plain))
    lookup = {value: number for number, value in enumerate(classes)}
    return np.fromiter((lookup[v] for v in plain), dtype=np.int64, count=len(plain)), classes


# ---------------------------------------------------------------------------------------------
# in-memory tensors and arrays


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise PrunekitError(f"{what} is an object array; give numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise PrunekitError(f"{what} cannot be read as an array: {exc}") from None


def _float_inputs(raw: torch.Tensor) -> torch.Tensor:
    if raw.dtype == torch.uint8:
        return raw.float() / 255.0  # 8-bit images: the usual [0, 1] scale
    return raw.float()


def _modality_of(shape: tuple[int, ...], what: str) -> str:
    if len(shape) == 2:
        return TABULAR
    if len(shape) in (3, 4):
        return IMAGE
    raise PrunekitError(f"{what} has shape {shape}; give one row per example: features (N, F), "
                        "images (N, H, W) or (N, C, H, W)")


class TensorSource(DataSource):
    """Inputs and labels already in memory (torch tensors or numpy arrays)."""

    def __init__(self, inputs: Any, labels: Any = None, description: str = "in-memory arrays",
                 extra: dict[str, Any] | None = None, file_format: str = ".npz",
                 keys: tuple[str, str | None] = ("inputs", "labels"), limit: int | None = None):
        _check_limit(limit)
        if limit is not None:
            rows = len(inputs)
            if labels is not None and len(labels) != rows:
                raise PrunekitError(f"{description}: {rows} inputs but {len(labels)} labels")
            extra = {k: v[:limit] if getattr(v, "ndim", 0) and v.shape[0] == rows else v
                     for k, v in (extra or {}).items()}
            inputs, labels = inputs[:limit], _first(labels, limit)
        self.raw_inputs = inputs
        self.description = description = _limited(description, limit)
        self.limit = limit
        tensor = _as_tensor(inputs, f"{description}: inputs")
        if tensor.ndim == 0 or tensor.shape[0] == 0:
            raise PrunekitError(f"{description} holds no examples")
        self.modality = _modality_of(tuple(tensor.shape), f"{description}: inputs")
        if not torch.isfinite(_float_inputs(tensor)).all():
            raise PrunekitError(f"{description}: inputs contain NaN or infinite values")
        self._tensor = tensor
        self.raw_labels = labels
        self._label_values: list | None = None
        if labels is not None:
            label_tensor = labels if isinstance(labels, (list, tuple)) else _as_tensor(labels, f"{description}: labels")
            if len(label_tensor) != tensor.shape[0]:
                raise PrunekitError(f"{description}: {tensor.shape[0]} inputs but {len(label_tensor)} labels")
            if isinstance(label_tensor, torch.Tensor) and label_tensor.ndim != 1:
                raise PrunekitError(f"{description}: labels must be one class per example, got shape "
                                    f"{tuple(label_tensor.shape)}")
            self._label_values = [_plain_label(v, description) for v in
                                  (label_tensor.tolist() if isinstance(label_tensor, torch.Tensor) else label_tensor)]
        self.extra = dict(extra or {})
        self.file_format = file_format
        self.keys = keys

    def __len__(self) -> int:
        return int(self._tensor.shape[0])

    def label_values(self) -> list | None:
        return self._label_values

    def inputs(self) -> torch.Tensor:
        x = _float_inputs(self._tensor)
        return x.unsqueeze(1) if x.ndim == 3 else x

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        digest.update(str(tuple(self._tensor.shape)).encode())
        digest.update(self._tensor.contiguous().numpy().tobytes())
        if self._label_values is not None:
            digest.update(json.dumps(self._label_values).encode())
        return {"kind": "arrays", "rows": len(self), "sha256": digest.hexdigest()}

    def subset(self, indices: np.ndarray):
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        picked = _take(self.raw_inputs, index)
        if self.raw_labels is None:
            return picked
        return picked, _take(self.raw_labels, index)

    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        from prunekit.io.atomic import atomic_file

        rows = len(self)
        index = np.asarray(indices, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        input_key, label_key = self.keys
        arrays[input_key] = _to_numpy(self.raw_inputs)[index]
        if self.raw_labels is not None and label_key is not None:
            labels = self.raw_labels
            arrays[label_key] = (np.asarray(labels)[index] if not isinstance(labels, torch.Tensor)
                                 else labels.numpy()[index])
        for key, value in self.extra.items():
            value = _to_numpy(value)
            arrays[key] = value[index] if value.ndim and value.shape[0] == rows else value
        path = folder / f"data{self.file_format}"
        if self.file_format == ".npz":
            with atomic_file(path, "wb") as handle:
                np.savez(handle, **arrays)
        elif self.file_format in (".pt", ".pth"):
            with atomic_file(path, "wb") as handle:
                torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, handle)
        else:
            from safetensors.torch import save

            with atomic_file(path, "wb") as handle:
                handle.write(save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}))
        return path


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _take(value: Any, index: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, np.ndarray):
        return value[index.numpy()]
    return [value[i] for i in index.tolist()]


class TextListSource(DataSource):
    """Texts in memory (a list of strings), with optional labels."""

    modality = TEXT

    def __init__(self, texts: Sequence[str], labels: Sequence[Any] | None = None, description: str = "in-memory texts",
                 limit: int | None = None):
        _check_limit(limit)
        self.description = description = _limited(description, limit)
        if limit is not None and labels is not None and len(labels) != len(texts):
            raise PrunekitError(f"{description}: {len(texts)} texts but {len(labels)} labels")
        texts = list(_first(texts, limit))
        labels = None if labels is None else _first(labels, limit)
        if not texts:
            raise PrunekitError(f"{description} holds no texts")
        for number, text in enumerate(texts):
            if not isinstance(text, str):
                raise PrunekitError(f"{description}: row {number} is {type(text).__name__}, not a string")
            if not text.strip():
                raise PrunekitError(f"{description}: row {number} is empty")
        self.texts = texts
        self._labels = None
        if labels is not None:
            labels = list(labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else labels)
            if len(labels) != len(texts):
                raise PrunekitError(f"{description}: {len(texts)} texts but {len(labels)} labels")
            self._labels = [_plain_label(v, description) for v in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def label_values(self) -> list | None:
        return self._labels

    def text_batches(self, batch_size: int) -> Iterator[list[str]]:
        for start in range(0, len(self.texts), batch_size):
            yield self.texts[start:start + batch_size]

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
        if self._labels is not None:
            digest.update(json.dumps(self._labels).encode())
        return {"kind": "texts", "rows": len(self), "sha256": digest.hexdigest()}

    def subset(self, indices: np.ndarray):
        texts = [self.texts[i] for i in np.asarray(indices).tolist()]
        if self._labels is None:
            return texts
        return texts, [self._labels[i] for i in np.asarray(indices).tolist()]

    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        from prunekit.io.atomic import atomic_file

        path = folder / "data.jsonl"
        with atomic_file(path, "w") as handle:
            for i in np.asarray(indices).tolist():
                row = {"text": self.texts[i]}
                if self._labels is not None:
                    row["label"] = self._labels[i]
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path


class TorchDatasetSource(DataSource):
    """A map-style ``torch.utils.data.Dataset`` whose items are ``(input, label)``, ``input`` or a dict."""

    def __init__(self, dataset, description: str | None = None, input_key: str = "input", label_key: str = "label",
                 limit: int | None = None):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise PrunekitError("a torch Dataset must be map-style (have __len__ and __getitem__); "
                                "pass an IterableDataset's items as tensors instead")
        _check_limit(limit)
        self.dataset = dataset
        self.description = _limited(description or f"torch dataset {type(dataset).__name__}", limit)
        count = len(dataset) if limit is None else min(len(dataset), limit)
        if count == 0:
            raise PrunekitError(f"{self.description} is empty")
        inputs, labels = [], []
        with progress_bar("Reading dataset", count) as bar:
            for i in range(count):
                item = dataset[i]
                if isinstance(item, dict):
                    if input_key not in item:
                        raise PrunekitError(f"{self.description}: item {i} has no key '{input_key}'")
                    x, y = item[input_key], item.get(label_key)
                elif isinstance(item, (tuple, list)):
                    if len(item) != 2:
                        raise PrunekitError(f"{self.description}: item {i} has {len(item)} parts; expected (input, label)")
                    x, y = item
                else:
                    x, y = item, None
                inputs.append(x)
                labels.append(y)
                bar.advance()
        has_labels = [y is not None for y in labels]
        if any(has_labels) and not all(has_labels):
            raise PrunekitError(f"{self.description}: some items have labels and some do not")
        label_values = labels if all(has_labels) else None
        if all(isinstance(x, str) for x in inputs):
            self._inner: DataSource = TextListSource(inputs, label_values, self.description)
        else:
            try:
                stacked = torch.stack([_as_tensor(x, f"{self.description}: item") for x in inputs])
            except RuntimeError as exc:
                raise PrunekitError(f"{self.description}: inputs differ in shape ({exc})") from None
            self._inner = TensorSource(stacked, label_values, self.description)
        self.modality = self._inner.modality

    def __len__(self) -> int:
        return len(self._inner)

    def label_values(self) -> list | None:
        return self._inner.label_values()

    def inputs(self) -> torch.Tensor:
        return self._inner.inputs()

    def text_batches(self, batch_size: int) -> Iterator[list[str]]:
        return self._inner.text_batches(batch_size)

    def fingerprint(self) -> dict[str, Any]:
        return self._inner.fingerprint()

    def subset(self, indices: np.ndarray):
        from torch.utils.data import Subset

        return Subset(self.dataset, np.asarray(indices, dtype=np.int64).tolist())

    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        return self._inner.write_subset(indices, folder)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets and local files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# The file readers of ``datasets`` log each parse error at ERROR level just before raising it; prunekit
# turns the exception into its own one line, so the logged copy would be a second line saying the same.
_READERS_THAT_LOG_WHAT_THEY_RAISE = ("json.json", "csv.csv", "parquet.parquet")


def _quiet_datasets() -> None:
    import logging

    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    for reader in _READERS_THAT_LOG_WHAT_THEY_RAISE:
        logging.getLogger(f"datasets.packaged_modules.{reader}").setLevel(logging.CRITICAL)


class RowSource(DataSource):
    """Rows (dicts) from a Hugging Face ``datasets`` object, streamed pass by pass.

    ``text_field`` names the text column; ``features`` names numeric columns (tabular data);
    ``label_field`` names the class column (``"auto"``: ``label`` when there is one).
    """

    def __init__(self, description: str, text_field: str | None = "text", label_field: str | None = "auto",
                 features: Sequence[str] | None = None, limit: int | None = None):
        _check_limit(limit)
        self.limit = limit
        self.description = _limited(description, limit)
        self._text_field = text_field
        self._label_field_spec = label_field
        self._feature_spec = list(features) if features else None
        self._scanned: dict[str, Any] | None = None
        self._resolve_columns()

    # subclasses provide the rows
    @abstractmethod
    def _raw_rows(self) -> Iterator[dict[str, Any]]: ...

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row in order (the first ``limit`` of them); a reader failure becomes one clear error."""
        iterator = iter(self._raw_rows())
        if self.limit is not None:
            iterator = itertools.islice(iterator, self.limit)
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except PrunekitError:
                raise
            except Exception as exc:  # pyarrow, pandas and codec errors from the readers
                raise PrunekitError(f"cannot read {self.description}: {_first_line(exc)}") from None
            yield row

    def _resolve_columns(self) -> None:
        first = next(self.rows(), None)
        if first is None:
            raise PrunekitError(f"{self.description} has no rows")
        self.columns = list(first)
        spec = self._label_field_spec
        if spec == "auto":
            self.label_field = "label" if "label" in self.columns else None
        elif spec:
            if spec not in self.columns:
                raise PrunekitError(f"{self.description} has no label column '{spec}'; columns: {', '.join(self.columns)}")
            self.label_field = spec
        else:
            self.label_field = None
        if self._feature_spec:
            missing = [c for c in self._feature_spec if c not in self.columns]
            if missing:
                raise PrunekitError(f"{self.description} has no column {', '.join(missing)}; columns: {', '.join(self.columns)}")
            if self.label_field in self._feature_spec:
                raise PrunekitError(f"the label column '{self.label_field}' cannot also be a feature")
            self.feature_fields = self._feature_spec
            self.modality = TABULAR
            self.text_field = None
        elif self._text_field and self._text_field in self.columns:
            self.text_field = self._text_field
            self.feature_fields = None
            self.modality = TEXT
        else:
            candidates = [c for c in self.columns if c != self.label_field]
            numeric = candidates and all(_is_number(first[c]) for c in candidates)
            if not numeric:
                raise PrunekitError(f"{self.description} has no text column '{self._text_field}'; name the text column "
                                    f"(--text-field) or the numeric feature columns (--features); columns: "
                                    f"{', '.join(self.columns)}")
            self.feature_fields = candidates
            self.modality = TABULAR
            self.text_field = None

    def _scan(self) -> dict[str, Any]:
        """One pass: row count, labels and (tabular data) the feature matrix; texts are not kept."""
        if self._scanned is not None:
            return self._scanned
        count = 0
        labels: list | None = [] if self.label_field else None
        features: list[list[float]] | None = [] if self.feature_fields else None
        with progress_bar(f"Reading {self.description}", None) as bar:
            for number, row in enumerate(self.rows()):
                if labels is not None:
                    labels.append(self._label(row.get(self.label_field), f"{self.description} row {number}"))
                if features is not None:
                    features.append([_number(row.get(c), f"{self.description} row {number} column '{c}'")
                                     for c in self.feature_fields])
                elif self.text_field is not None:
                    text = row.get(self.text_field)
                    if not isinstance(text, str) or not text.strip():
                        raise PrunekitError(f"{self.description} row {number}: column '{self.text_field}' has no text")
                count += 1
                bar.advance()
        if count == 0:
            raise PrunekitError(f"{self.description} has no rows")
        self._scanned = {"count": count, "labels": labels,
                         "features": None if features is None else torch.tensor(features, dtype=torch.float32)}
        return self._scanned

    def _label(self, value: Any, where: str) -> Any:
        return _plain_label(value, where)

    def __len__(self) -> int:
        return self._scan()["count"]

    def label_values(self) -> list | None:
        return self._scan()["labels"]

    def inputs(self) -> torch.Tensor:
        if self.modality != TABULAR:
            return super().inputs()
        features = self._scan()["features"]
        if not torch.isfinite(features).all():
            raise PrunekitError(f"{self.description}: feature columns contain NaN or infinite values")
        return features

    def text_batches(self, batch_size: int) -> Iterator[list[str]]:
        if self.modality != TEXT:
            yield from super().text_batches(batch_size)
            return
        texts = (row[self.text_field] for row in self.rows())
        while True:
            batch = list(itertools.islice(texts, batch_size))
            if not batch:
                return
            for text in batch:
                if not isinstance(text, str) or not text.strip():
                    raise PrunekitError(f"{self.description}: a row's column '{self.text_field}' has no text")
            yield batch

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update({"columns": self.columns, "text_field": self.text_field, "label_field": self.label_field,
                     "feature_fields": self.feature_fields})
        return info


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise PrunekitError(f"{where} is {'empty' if value is None else 'a boolean'}, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PrunekitError(f"{where} is {value!r}, not a number") from None


class HFDatasetSource(RowSource):
    """A ``datasets.Dataset`` or ``datasets.IterableDataset`` given in Python."""

    def __init__(self, dataset, text_field: str | None = "text", label_field: str | None = "auto",
                 features: Sequence[str] | None = None, description: str | None = None, limit: int | None = None):
        self.dataset = dataset
        super().__init__(description or f"datasets.{type(dataset).__name__}", text_field, label_field, features,
                         limit)

    def _raw_rows(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)

    def fingerprint(self) -> dict[str, Any]:
        info = {"kind": "datasets", "rows": len(self), "limit": self.limit}
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if fingerprint:
            info["datasets_fingerprint"] = fingerprint
        return info

    def subset(self, indices: np.ndarray):
        import datasets

        index = np.asarray(indices, dtype=np.int64).tolist()
        if isinstance(self.dataset, datasets.Dataset):
            return self.dataset.select(index)
        wanted = set(index)
        return [row for number, row in enumerate(self.rows()) if number in wanted]

    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        from prunekit.io.atomic import atomic_file

        wanted = set(np.asarray(indices).tolist())
        path = folder / "data.jsonl"
        with atomic_file(path, "w") as handle:
            for number, row in enumerate(self.rows()):
                if number in wanted:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return path


class FileSource(RowSource):
    """A local ``.jsonl``/``.csv``/``.tsv``/``.parquet``/``.txt`` file, read offline and streamed by ``datasets``.

    CSV cells are read as text (no type guessing: ``007`` stays ``007``), so the rows written back
    are the input's rows. Plain text has one example per non-blank line (``text_unit="line"``) or
    per paragraph, a run of non-blank lines (``text_unit="paragraph"``).
    """

    def __init__(self, path: str | os.PathLike, text_field: str | None = "text", label_field: str | None = "auto",
                 features: Sequence[str] | None = None, text_unit: str = "line", limit: int | None = None):
        self.path = Path(path).expanduser()
        self.suffix = self.path.suffix.lower()
        check_readable_file(self.path)
        if self.suffix not in FILE_FORMATS:
            raise PrunekitError(f"cannot read {self.path.name}: unknown file type '{self.suffix}'; use "
                                f"{', '.join(sorted(FILE_FORMATS))} or {', '.join(ARRAY_FORMATS)}")
        self.format = FILE_FORMATS[self.suffix]
        if text_unit not in ("line", "paragraph"):
            raise PrunekitError(f"text unit must be line or paragraph, got '{text_unit}'")
        self.text_unit = text_unit
        self._csv_columns: list[str] | None = None
        if self.format == "text":
            text_field, features = "text", None
            label_field = None
        super().__init__(str(self.path), text_field, label_field, features, limit)

    def _load(self):
        _quiet_datasets()
        from datasets import load_dataset

        kwargs: dict[str, Any] = {}
        if self.format == "csv":
            columns = self._read_csv_header()
            from datasets import Features, Value

            kwargs = {"features": Features({c: Value("string") for c in columns}), "keep_default_na": False,
                      "na_filter": False}
            if self.suffix == ".tsv":
                kwargs["sep"] = "\t"
        return load_dataset(self.format, data_files=str(self.path), split="train", streaming=True, **kwargs)

    def _read_csv_header(self) -> list[str]:
        if self._csv_columns is None:
            try:
                with open(self.path, newline="", encoding="utf-8") as handle:
                    header = next(csv.reader(handle, delimiter="\t" if self.suffix == ".tsv" else ","), None)
            except UnicodeDecodeError:
                raise PrunekitError(f"cannot read {self.path}: it is not UTF-8 text") from None
            if not header or not any(h.strip() for h in header):
                raise PrunekitError(f"{self.path} has no header row")
            if len(set(header)) != len(header):
                raise PrunekitError(f"{self.path} repeats a column name in its header")
            self._csv_columns = header
        return self._csv_columns

    def _raw_rows(self) -> Iterator[dict[str, Any]]:
        try:
            dataset = self._load()
        except PrunekitError:
            raise
        except Exception as exc:
            raise PrunekitError(f"cannot read {self.path}: {_first_line(exc)}") from None
        if self.format != "text":
            return iter(dataset)
        lines = (row["text"] for row in dataset)
        return ({"text": unit} for unit in _text_units(lines, self.text_unit))

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path.resolve()), "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "rows": len(self), "text_unit": self.text_unit, "limit": self.limit}

    def _label(self, value: Any, where: str) -> Any:
        return _text_label(value, where) if self.format == "csv" else _plain_label(value, where)

    def subset(self, indices: np.ndarray) -> list[dict[str, Any]]:
        wanted = set(np.asarray(indices).tolist())
        return [row for number, row in enumerate(self.rows()) if number in wanted]

    def write_subset(self, indices: np.ndarray, folder: Path) -> Path:
        from prunekit.io.atomic import atomic_file

        index = np.unique(np.asarray(indices, dtype=np.int64))
        wanted = set(index.tolist())
        path = folder / f"data{self.suffix}"
        if self.format == "json":
            self._write_json_lines(wanted, path)
        elif self.format == "csv":
            with atomic_file(path, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=self._read_csv_header(), lineterminator="\n",
                                        delimiter="\t" if self.suffix == ".tsv" else ",")
                writer.writeheader()
                for number, row in enumerate(self.rows()):
                    if number in wanted:
                        writer.writerow(row)
        elif self.format == "parquet":
            self._write_parquet(index, path)
        else:
            separator = "\n" if self.text_unit == "line" else "\n\n"
            with atomic_file(path, "w") as handle:
                first = True
                for number, row in enumerate(self.rows()):
                    if number in wanted:
                        handle.write(("" if first else separator) + row["text"])
                        first = False
                handle.write("\n")
        return path

    def _write_json_lines(self, wanted: set[int], path: Path) -> None:
        """JSON Lines rows are copied byte for byte: the reader counts one row per non-blank line."""
        from prunekit.io.atomic import atomic_file

        number, rows = -1, len(self)
        with open(self.path, "rb") as source, atomic_file(path, "wb") as handle:
            for line in source:
                if not line.strip():
                    continue
                if self.limit is not None and number + 1 == rows:
                    break  # only the first `limit` rows were read; the rest are not looked at
                number += 1
                if number in wanted:
                    if self.limit is not None:
                        _one_json_object(line, self.path)
                    handle.write(line if line.endswith(b"\n") else line + b"\n")
        if number + 1 != rows:
            raise PrunekitError(f"{self.path} is not JSON Lines (one object per line): {number + 1} non-blank lines "
                                f"but {len(self)} rows")

    def _write_parquet(self, index: np.ndarray, path: Path) -> None:
        """The selected rows, batch by batch; batches after the last selected row (past a limit) are not read."""
        import pyarrow.parquet as pq

        from prunekit.io.atomic import atomic_file

        source = pq.ParquetFile(self.path)
        offset = 0
        with atomic_file(path, "wb") as handle:
            writer = pq.ParquetWriter(handle, source.schema_arrow)
            for batch in source.iter_batches(batch_size=8192):
                lo, hi = np.searchsorted(index, [offset, offset + batch.num_rows])
                if hi > lo:
                    writer.write_batch(batch.take(index[lo:hi] - offset))
                offset += batch.num_rows
                if hi == len(index):
                    break
            writer.close()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update({"path": str(self.path), "format": self.format,
                     "text_unit": self.text_unit if self.format == "text" else None})
        return info


def _one_json_object(line: bytes, path: Path) -> None:
    """A line copied from a JSON Lines file read only in part must hold one whole object (the full
    file's line count is not there to compare with the reader's row count)."""
    try:
        whole = isinstance(json.loads(line), dict)
    except ValueError:
        whole = False
    if not whole:
        raise PrunekitError(f"{path} is not JSON Lines (one object per line)")


def _text_units(lines: Iterator[str], unit: str) -> Iterator[str]:
    """Examples of a plain-text file: non-blank lines, or paragraphs (runs of non-blank lines)."""
    if unit == "line":
        for line in lines:
            if line.strip():
                yield line
        return
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def check_readable_file(path: Path) -> None:
    if not path.exists():
        raise PrunekitError(f"no such file: {path}")
    if path.is_dir():
        raise PrunekitError(f"{path} is a directory; give a data file")
    if not os.access(path, os.R_OK):
        raise PrunekitError(f"cannot read {path}: permission denied")
    if path.stat().st_size == 0:
        raise PrunekitError(f"{path} is empty")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# array files and the built-in set


class ArrayFileSource(TensorSource):
    """``.npz`` / ``.pt`` / ``.safetensors`` holding an inputs array and (optionally) a labels array."""

    def __init__(self, path: str | os.PathLike, input_key: str | None = None, label_key: str | None = "auto",
                 limit: int | None = None):
        self.path = Path(path).expanduser()
        check_readable_file(self.path)
        suffix = self.path.suffix.lower()
        arrays = _read_arrays(self.path, suffix)
        input_key = input_key or next((k for k in INPUT_KEYS if k in arrays), None)
        if input_key is None or input_key not in arrays:
            raise PrunekitError(f"{self.path} has no inputs array "
                                f"({'name it with --input-key; ' if input_key is None else ''}arrays: {', '.join(arrays)})")
        if label_key == "auto":
            label_key = next((k for k in LABEL_KEYS if k in arrays), None)
        elif label_key and label_key not in arrays:
            raise PrunekitError(f"{self.path} has no labels array '{label_key}'; arrays: {', '.join(arrays)}")
        extra = {k: v for k, v in arrays.items() if k not in (input_key, label_key)}
        super().__init__(arrays[input_key], arrays[label_key] if label_key else None, description=str(self.path),
                         extra=extra, file_format=".pt" if suffix == ".pth" else suffix, keys=(input_key, label_key),
                         limit=limit)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path.resolve()), "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "rows": len(self), "limit": self.limit}


def _read_arrays(path: Path, suffix: str) -> dict[str, Any]:
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
                return {"inputs": loaded[0], "labels": loaded[1]}
            if isinstance(loaded, torch.Tensor):
                return {"inputs": loaded}
            if not isinstance(loaded, dict):
                raise PrunekitError(f"{path} holds a {type(loaded).__name__}; save a dict of tensors or (inputs, labels)")
            return dict(loaded)
        from safetensors.torch import load_file

        return load_file(str(path))
    except PrunekitError:
        raise
    except Exception as exc:  # corrupt archives, pickles refused by weights_only, wrong formats
        raise PrunekitError(f"cannot read {path}: {_first_line(exc)}") from None


class FashionMnistSource(TensorSource):
    """The built-in Fashion-MNIST split (normalised images, labels 0-9), optionally its first ``limit`` rows."""

    def __init__(self, split: str = "train", limit: int | None = None):
        from prunekit.models.fashion_mnist import load_fashion_mnist

        _check_limit(limit)
        data = load_fashion_mnist(split, limit)
        name = f"{BUILTIN}:{split}" + (f" (first {limit})" if limit else "")
        super().__init__(data.images, data.labels, description=name, keys=("images", "labels"))
        self.split, self.limit = split, limit

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "builtin", "name": BUILTIN, "split": self.split, "limit": self.limit, "rows": len(self)}


# ---------------------------------------------------------------------------------------------


def open_data(data: Any, labels: Any = None, *, text_field: str | None = "text", label_field: str | None = "auto",
              features: Sequence[str] | None = None, text_unit: str = "line", input_key: str | None = None,
              limit: int | None = None) -> DataSource:
    """Wrap whatever the user has into a :class:`DataSource`.

    ``data`` is a DataSource, a path (file formats above, or ``fashion-mnist[:train|test]``),
    a tensor or array of inputs (``labels`` beside it), an ``(inputs, labels)`` pair, a list of
    strings, a map-style torch Dataset, or a Hugging Face ``datasets`` object. ``limit`` keeps only the
    first ``limit`` examples, whatever the source.
    """
    _check_limit(limit)
    if isinstance(data, DataSource):
        if limit is not None and getattr(data, "limit", None) != limit:
            raise PrunekitError(f"{data.description} is already open; give the limit when opening it "
                                f"(open_data(..., limit={limit}))")
        return data
    if isinstance(data, (str, os.PathLike)):
        text = str(data)
        if text.lower().split(":")[0] == BUILTIN and not Path(text).exists():
            split = text.split(":", 1)[1] if ":" in text else "train"
            return FashionMnistSource(split, limit)
        path = Path(text).expanduser()
        if path.suffix.lower() in ARRAY_FORMATS:
            return ArrayFileSource(path, input_key, label_field, limit=limit)
        return FileSource(path, text_field, label_field, features, text_unit, limit=limit)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return TensorSource(data, labels, limit=limit)
    if isinstance(data, tuple) and len(data) == 2 and labels is None:
        first = data[0]
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], str):
            return TextListSource(first, data[1], limit=limit)
        return TensorSource(data[0], data[1], limit=limit)
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return TextListSource(data, labels, limit=limit)
    try:
        import datasets

        if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
            return HFDatasetSource(data, text_field, label_field, features, limit=limit)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    from torch.utils.data import Dataset

    if isinstance(data, Dataset):
        return TorchDatasetSource(data, limit=limit)
    raise PrunekitError(f"cannot use {type(data).__name__} as training data; give tensors, arrays, texts, a torch "
                        "Dataset, a datasets.Dataset or a file path")

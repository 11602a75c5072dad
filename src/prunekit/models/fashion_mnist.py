"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (60 k train / 10 k test, 28×28)."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PrunekitError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images, for normalisation
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 1, 28, 28) float32, normalised
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]


def data_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_FASHION_MNIST", DEFAULT_DIR))


def available() -> bool:
    return all((data_dir() / name).exists() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> ImageSet:
    """Normalised images and labels of one split; ``limit`` keeps the first N (file order)."""
    if split not in _FILES:
        raise PrunekitError(f"unknown Fashion-MNIST split '{split}'; choose train or test")
    folder = data_dir()
    image_file, label_file = (folder / name for name in _FILES[split])
    if not image_file.exists() or not label_file.exists():
        raise PrunekitError(f"Fashion-MNIST is not installed in {folder}: "
                            "apt-get install dataset-fashion-mnist (or set PRUNEKIT_FASHION_MNIST)")
    images = _read_idx(image_file, 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(label_file, 8).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return ImageSet(images=x, labels=torch.from_numpy(labels.copy()))

"""Fixtures of the sparse-training tests: a slice of real Fashion-MNIST."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fashion_small():
    """The first 4 000 training and 2 000 test images of the real Fashion-MNIST."""
    from prunekit.models.fashion_mnist import available, load_fashion_mnist

    if not available():
        pytest.fail("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    return load_fashion_mnist("train", 4000), load_fashion_mnist("test", 2000)

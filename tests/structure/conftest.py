"""Fixtures for structural pruning tests (helpers live in structure_helpers.py)."""

from __future__ import annotations

import pytest
from structure_helpers import TOKENS, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def llama_inputs():
    return {"input_ids": TOKENS, "use_cache": False}

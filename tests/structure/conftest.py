"""Fixtures for structural pruning tests (helpers live in structure_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from structure_helpers import TOKENS, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def llama_inputs():
    return {"input_ids": TOKENS, "use_cache": False}


CALIBRATION_TEXT = ("Pruning whole structures makes a model smaller and faster on ordinary hardware. "
                    "Calibration text feeds the activation statistics of every criterion that needs them. ") * 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved two-block GQA Llama with the real tokenizer, and a calibration ``text.txt`` beside it."""
    path = tmp_path_factory.mktemp("structure") / "tiny"
    tiny_llama(layers=2, hidden=64, intermediate=256, heads=4, kv_heads=2, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "text.txt").write_text(CALIBRATION_TEXT)
    return path

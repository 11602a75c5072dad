"""Shared fixtures: offline hub, quiet progress, the real SmolLM2 and tiny random models.

Two kinds of test (docs/DEVELOPING.md, "Tests"): unit tests on tiny random models, the default
``pytest -m "not slow"`` run, and real-model tests marked ``slow``. A test that uses a fixture loading a
real model (``REAL_MODEL_FIXTURES``) is marked ``slow`` here; a test that loads one itself carries the
mark in its file. The tokenizer and the path of SmolLM2 are cheap and do not make a test slow.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PRUNEKIT_QUIET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Fixtures that load a real model (SmolLM2-135M, all-MiniLM-L6-v2) or run one: any test using one is slow.
REAL_MODEL_FIXTURES = frozenset({
    "smollm2",          # SmolLM2-135M in fp32 (here)
    "smollm2_loaded",   # the same, once per module (tests/tokens/test_token_real_models.py)
    "real_layers",      # three SmolLM2 layers with their real inputs (tests/weights/test_methods.py)
    "pruned_runs",      # two CLI prunes of SmolLM2 (tests/cli/test_prune_cli.py)
    "minilm",           # all-MiniLM-L6-v2 (tests/tokens/test_token_real_models.py)
})


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow(reason="uses a real model")
    for item in items:
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(slow)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from prunekit.models.assets import smollm2_path

    return smollm2_path()


@pytest.fixture()
def smollm2(smollm2_dir):
    """A fresh SmolLM2-135M (fp32) and its tokenizer; tests may modify it."""
    from prunekit.models.loading import load_model

    return load_model(smollm2_dir, kind="causal-lm")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


TINY_VOCAB = 256  # the vocabulary of the tiny Llamas the low-rank and rotation tests build


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    """Eight 32-token windows of random ids below TINY_VOCAB: calibration for ``tiny_llama(vocab=TINY_VOCAB)``
    (a module defining its own ``calibration`` fixture overrides this one)."""
    return torch.randint(0, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def tiny_inputs() -> torch.Tensor:
    """Two 24-token inputs for the same tiny Llamas, other than the calibration windows."""
    return torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
               vocab: int = 49152, seed: int = 0, tie: bool = True):
    """A random Llama-architecture model sharing SmolLM2's vocabulary, so its tokenizer works."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=1024, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer) -> Path:
    """A saved tiny Llama with SmolLM2's tokenizer: a real model directory that loads in a blink."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

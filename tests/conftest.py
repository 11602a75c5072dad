"""Shared fixtures: offline hub, quiet progress, the real SmolLM2 and tiny random models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PRUNEKIT_QUIET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


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

"""Tiny random models of every family token reduction supports, built in a blink."""

from __future__ import annotations

import pytest
import torch


def prunekit_vit(depth: int = 4, seed: int = 0):
    from prunekit.models.vit import ViT

    torch.manual_seed(seed)
    return ViT(dim=48, depth=depth, num_heads=4, mlp_ratio=2.0).eval()


def hf_vit(attn: str = "sdpa", layers: int = 4, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=96, num_labels=10, attn_implementation=attn)
    return ViTForImageClassification(config).eval()


def tiny_bert(attn: str = "sdpa", layers: int = 4, seed: int = 0, kind: str = "bert"):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    settings = dict(vocab_size=500, hidden_size=48, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=96, max_position_embeddings=128, attn_implementation=attn)
    if kind == "roberta":
        return RobertaModel(RobertaConfig(pad_token_id=1, **settings)).eval()
    return BertModel(BertConfig(**settings)).eval()


def tiny_decoder(attn: str = "sdpa", layers: int = 4, seed: int = 0, vocab: int = 500):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def images():
    return torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def padded_text():
    """Three sequences of 20, 13 and 7 real tokens, padded on the right to 20."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 20), generator=generator)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for row, length in enumerate((20, 13, 7)):
        mask[row, :length] = 1
    return ids * mask, mask

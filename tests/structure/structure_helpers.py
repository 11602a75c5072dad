"""Small models for structural pruning tests, and the exactness check every family must pass."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from prunekit.models import adapter_for
from prunekit.models.vit import ViT
from prunekit.structure.graph import build_graph
from prunekit.structure.shrink import shrink, zero_units
from prunekit.structure.zoo import DenseNetLike, MobileNetV2Like, ResNetLike


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so zeroed channels are really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model.eval()


def tiny_llama(layers: int = 2, hidden: int = 32, intermediate: int = 64, heads: int = 4, kv_heads: int = 2,
               vocab: int = 256, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=tie, head_dim=hidden // heads)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=128, max_position_embeddings=64)).eval()


IMAGES = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
SMALL_IMAGES = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))


def vision_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"resnet": randomize_norms(ResNetLike()), "mobilenet": randomize_norms(MobileNetV2Like()),
            "densenet": randomize_norms(DenseNetLike()), "vit": randomize_norms(ViT(dim=48, depth=2, num_heads=3))}


def run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output


def graph_of(model: nn.Module, inputs, head_mode: str = "kv"):
    adapter = adapter_for(model) if getattr(getattr(model, "config", None), "model_type", None) else None
    return build_graph(model, inputs, adapter=adapter, head_mode=head_mode), adapter


def shrunk_equals_zeroed(model: nn.Module, inputs, family_name: str, units: list[int], head_mode: str = "kv",
                         graph=None) -> float:
    """Largest difference between the shrunk model and the original with the same units zeroed.

    ``graph`` (of ``model``) is reused for copies when the family has no head layout bound to modules."""
    if graph is None or graph.family(family_name).heads is not None:
        graph = None
    zeroed = copy.deepcopy(model)
    zero_graph = dataclasses.replace(graph, model=zeroed) if graph is not None else graph_of(zeroed, inputs, head_mode)[0]
    zero_units(zero_graph, zero_graph.family(family_name), units)
    shrunk = copy.deepcopy(model)
    if graph is not None:
        shrink_graph, adapter = dataclasses.replace(graph, model=shrunk), None
    else:
        shrink_graph, adapter = graph_of(shrunk, inputs, head_mode)
    shrink(shrink_graph, {family_name: units}, adapter=adapter)
    return float((run(zeroed, inputs) - run(shrunk, inputs)).abs().max())

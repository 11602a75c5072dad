"""Depth pruning: block influence by hand, removal bookkeeping, the perplexity criterion, and shrink details."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.vit import ViT
from prunekit.structure.depth import block_influence, prune_depth, remove_blocks
from prunekit.structure.graph import build_graph
from prunekit.structure.shrink import shrink
from structure_helpers import TOKENS, graph_of, run, tiny_llama


def _vit_with_identity_block(identity: int = 1) -> ViT:
    torch.manual_seed(0)
    model = ViT(dim=32, depth=3, num_heads=2).eval()
    with torch.no_grad():
        block = model.blocks[identity]
        for linear in (block.attn.proj, block.mlp.fc2):  # residual branches that add nothing
            linear.weight.zero_()
            linear.bias.zero_()
    return model


def test_block_influence_is_one_minus_cosine():
    model = _vit_with_identity_block(1)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    scores = block_influence(model, "blocks", [(images[:2],), (images[2:],)])
    x = model.embed(images)
    expected = []
    with torch.no_grad():
        for block in model.blocks:
            y = block(x)
            expected.append(float((1 - F.cosine_similarity(x.reshape(-1, 32), y.reshape(-1, 32), dim=-1)).mean()))
            x = y
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert scores[1] == pytest.approx(0.0, abs=1e-7) and scores[0] > 0.01


def test_prune_depth_removes_the_least_influential_block():
    model = _vit_with_identity_block(2)
    images = torch.randn(2, 1, 28, 28)
    before = run(model, (images,))
    result = prune_depth(model, "blocks", 1, "influence", [(images,)])
    assert result.removed == [2] and len(model.blocks) == 2
    assert torch.allclose(run(model, (images,)), before, atol=1e-5)  # it added nothing
    evaluate_model = _vit_with_identity_block(0)
    target = run(evaluate_model, (images,))

    def evaluate(m: nn.Module) -> float:
        return float((run(m, (images,)) - target).abs().mean())

    result = prune_depth(evaluate_model, "blocks", 1, "perplexity", evaluate=evaluate)
    assert result.removed == [0] and result.scores[0] == pytest.approx(0.0, abs=1e-6)


def test_removing_llama_blocks_updates_config_and_cache_slots():
    model = tiny_llama(layers=4)
    remove_blocks(model, "model.layers", [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        output = model(input_ids=TOKENS, use_cache=True)  # the key/value cache is indexed by layer_idx
    assert len(output.past_key_values.layers) == 2


def test_bad_depth_requests():
    model = tiny_llama(layers=2)
    with pytest.raises(PrunekitError, match="keep at least one"):
        prune_depth(model, "model.layers", 2, "influence", [{"input_ids": TOKENS}])
    with pytest.raises(PrunekitError, match="whole number"):
        prune_depth(model, "model.layers", -1, "influence", [{"input_ids": TOKENS}])
    with pytest.raises(PrunekitError, match="unknown depth criterion"):
        prune_depth(model, "model.layers", 1, "magic", [{"input_ids": TOKENS}])
    with pytest.raises(PrunekitError, match="is not a list of blocks"):
        prune_depth(model, "model.norm", 1, "influence", [{"input_ids": TOKENS}])


def test_tied_embeddings_stay_tied_when_the_hidden_width_shrinks():
    model = tiny_llama()
    graph, adapter = graph_of(model, {"input_ids": TOKENS, "use_cache": False})
    hidden = [f for f in graph.families if f.kind == "hidden"][0]
    shrink(graph, {hidden.name: list(range(0, 32, 4))}, adapter=adapter)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.embedding_dim == 24 and model.model.layers[0].input_layernorm.weight.shape == (24,)
    updates, blockers = adapter.structure_config()
    assert updates["hidden_size"] == 24 and not blockers
    assert run(model, {"input_ids": TOKENS}).shape == (2, 8, 256)


class _Fixed(nn.Module):
    """Keeps its width as an attribute the tracer cannot see (a constant of that size)."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x + torch.zeros(x.shape[0], self.width)


def test_a_hidden_size_attribute_is_caught_after_shrinking():
    model = nn.Sequential(nn.Linear(4, 6), _Fixed(6), nn.ReLU(), nn.Linear(6, 2))
    graph = build_graph(model, (torch.randn(3, 4),))
    with pytest.raises(PrunekitError, match="no longer runs .* keeps a size attribute"):
        shrink(graph, {graph.families[0].name: [0]})

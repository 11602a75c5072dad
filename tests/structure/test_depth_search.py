"""Choosing which blocks to remove by measurement (issue 18): knapsack on each block's KL alone, then evolution."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.structure.depth import prune_depth, search_blocks
from tests.conftest import tiny_llama

EVOLUTION = {"name": "evolutionary", "generations": 4, "offspring": 3, "stage_tokens": [16, 48], "survivors": [2]}


def _windows():
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    return [ids[i:i + 1] for i in range(3)]


def test_knapsack_removes_the_blocks_cheapest_alone_and_evolution_never_does_worse():
    model = tiny_llama(layers=5, hidden=32, intermediate=64, vocab=256, seed=4)
    removed, outcome, alone = search_blocks(model, "model.layers", 2, _windows(), {"name": "knapsack",
                                                                                    "sensitivity_tokens": 16})
    assert removed == sorted(sorted(range(5), key=lambda i: alone[i])[:2])
    assert len(model.model.layers) == 5  # the model is left whole
    evolved, outcome, _ = search_blocks(model, "model.layers", 2, _windows(), EVOLUTION, keep=[0])
    assert len(evolved) == 2 and 0 not in evolved
    assert outcome.fitness <= outcome.start_fitness
    again, repeat, _ = search_blocks(model, "model.layers", 2, _windows(), EVOLUTION, keep=[0])
    assert again == evolved and repeat.curve == outcome.curve


def test_prune_depth_by_search_removes_the_blocks_found():
    model = tiny_llama(layers=4, hidden=32, intermediate=64, vocab=256, seed=4)
    result = prune_depth(model, "model.layers", 1, "search", _windows(), search=EVOLUTION)
    assert result.blocks_after == 3 and len(model.model.layers) == 3 and len(result.removed) == 1
    assert result.criterion == "search" and all(s >= 0 for s in result.scores)
    with pytest.raises(PrunekitError, match="does not measure"):
        search_blocks(model, "model.layers", 1, _windows(), "uniform")

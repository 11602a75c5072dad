"""The plan ``prune_structure`` follows: ``WidthSettings``, built once (from a recipe) and passed down."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.pipeline import WidthSettings
from prunekit.structure.recipe import ShrinkRecipe
from structure_helpers import tiny_llama

WINDOWS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _widths(result) -> dict:
    return result.plan.widths


def test_settings_and_keywords_are_one_plan():
    by_keyword = prune_structure(tiny_llama(), 0.3, example_inputs=lm_example_inputs(), importance="wanda",
                                 allocation={"round_to": 1}, calibration=lm_calibration(WINDOWS))
    settings = WidthSettings(ratio=0.3, importance="wanda", allocation={"round_to": 1})
    by_settings = prune_structure(tiny_llama(), example_inputs=lm_example_inputs(), settings=settings,
                                  calibration=lm_calibration(WINDOWS))
    assert _widths(by_settings) == _widths(by_keyword)
    assert by_settings.importance == by_keyword.importance and by_settings.importance["name"] == "wanda"
    # a keyword replaces the plan's value, the rest of the plan stays
    smaller = prune_structure(tiny_llama(), 0.1, example_inputs=lm_example_inputs(), settings=settings,
                              calibration=lm_calibration(WINDOWS))
    assert smaller.plan.ratio == 0.1 and smaller.importance["name"] == "wanda"
    assert smaller.plan.total_after > by_settings.plan.total_after
    assert settings.ratio == 0.3  # the plan itself is not changed


def test_settings_are_checked_and_normalised_when_made():
    settings = WidthSettings(granularity="neurons,heads", allocation="uniform", ignore=["lm_head"])
    assert settings.granularity == ("channels", "heads") and settings.allocation.name == "uniform"
    assert settings.ignore == ("lm_head",) and settings.importance.name == "l2"
    for changes, message in [({"ratio": 1.0}, r"ratio must be in \[0, 1\)"), ({"damping": 0}, "damping must lie in"),
                             ({"target": "flops"}, "target must be params or macs"),
                             ({"head_mode": "all"}, "heads mode must be kv or query"),
                             ({"importance": "obs"}, "unknown importance criterion 'obs'"),
                             ({"granularity": "layers"}, "unknown granularity 'layers'"),
                             ({"budget": 3}, "unknown structural pruning setting 'budget'")]:
        with pytest.raises(PrunekitError, match=message):
            WidthSettings.of(**changes)
    with pytest.raises(PrunekitError, match="reconstruction refits layers on calibration data"):
        prune_structure(tiny_llama(), 0.2, example_inputs=lm_example_inputs(), reconstruct=True)


def test_a_recipe_builds_the_plan_once():
    recipe = ShrinkRecipe(ratio=0.25, target="macs", heads="query", granularity="channels", lenient=True,
                          ignore=["model.layers.0.*"], overrides={"model.layers.1.mlp": 0.5}, reconstruct=True,
                          reconstruct_damping=0.3, allocation={"name": "uniform", "round_to": 4},
                          data={"seed": 7})
    with pytest.raises(PrunekitError, match="names no importance criterion yet"):
        recipe.width_settings()
    causal = recipe.with_default_importance("causal-lm")
    settings = causal.width_settings()
    assert settings.importance.name == "fisher" and causal.importance == {"name": "fisher", "reduction": "sum"}
    assert recipe.with_default_importance("encoder").width_settings().importance.name == "flap"
    assert (settings.ratio, settings.target, settings.head_mode, settings.granularity) == (0.25, "macs", "query",
                                                                                        ("channels",))
    assert settings.strict is False and settings.reconstruct and settings.damping == 0.3 and settings.seed == 7
    assert settings.ignore == ("model.layers.0.*",) and settings.overrides == {"model.layers.1.mlp": 0.5}
    assert settings.allocation.name == "uniform" and settings.allocation.round_to == 4
    named = ShrinkRecipe(importance="taylor")
    assert named.with_default_importance("causal-lm") is named

"""llm-compressor recipes (WandaPruningModifier, SparseGPTModifier, MagnitudePruningModifier) run as prunekit
recipes: the translation equals the hand-written prunekit recipe, and anything prunekit would run differently is
refused by name."""

import re

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.weights.llmcompressor_recipe import translate
from prunekit.weights.recipe import WeightPruningRecipe

# Written as llm-compressor's documentation and modifiers spell them (stage -> group -> modifier -> settings).
SPARSEGPT_24 = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      dampening_frac: 0.001
      block_size: 64
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
"""
WANDA_OWL = """
test_stage:
  obcq_modifiers:
    WandaPruningModifier:
      sparsity: 0.6
      sparsity_profile: owl
      owl_m: 5
      owl_lmbda: 0.08
      ignore: ["re:.*lm_head", "model.layers.1.mlp.down_proj"]
"""
MAGNITUDE = """
pruning_stage:
  pruning_modifiers:
    MagnitudePruningModifier:
      init_sparsity: 0.4
      final_sparsity: 0.4
      start: 0
      end: 0
      targets: ["re:model.layers.0.mlp.*.weight"]
"""
WANDA_NAMED = """
WandaPruningModifier:
  sparsity: 0.5
  targets: ["re:model.layers.0$"]
  ignore: ["re:.*o_proj"]
"""


@pytest.mark.parametrize("text,expected", [
    (SPARSEGPT_24, {"method": {"name": "sparsegpt", "dampening": 0.001, "block_size": 64}, "pattern": "2:4",
                    "exclude": ["re:^(?:.*lm_head)"]}),
    (WANDA_OWL, {"method": "wanda", "ratio": 0.6, "allocation": {"name": "owl", "threshold_m": 5, "lambda": 0.08},
                 "exclude": ["re:^(?:.*lm_head)", r"re:^model\.layers\.1\.mlp\.down_proj$"]}),
    (MAGNITUDE, {"method": "magnitude", "ratio": 0.4, "include": [r"re:^(?:model.layers.0.mlp.*)(?:\..*)?$"]}),
    (WANDA_NAMED, {"method": "wanda", "ratio": 0.5, "include": [r"re:^(?:model.layers.0)(?:\..*)?$"],
                   "exclude": ["re:^(?:.*o_proj)"]}),
], ids=["sparsegpt-2:4", "wanda-owl", "magnitude", "wanda-named"])
def test_translation_equals_the_hand_written_recipe(text, expected):
    assert WeightPruningRecipe.build(translate(yaml.safe_load(text))) == WeightPruningRecipe.build(expected)


def test_patterns_keep_llmcompressor_matching():
    """re: patterns match from the start of a name there (re.match), anywhere here: the translation anchors them."""
    recipe = translate(yaml.safe_load(WANDA_NAMED))
    include = re.compile(recipe["include"][0][3:])
    assert include.search("model.layers.0.mlp.up_proj") and include.search("model.layers.0")
    assert not include.search("model.layers.01.mlp.up_proj") and not include.search("x.model.layers.0.mlp")
    assert translate(yaml.safe_load("WandaPruningModifier: {sparsity: 0.5, mask_structure: '1:4', "
                                    "ignore: [lm_head]}"))["pattern"] == "3:4"  # 1 pruned of 4 = 3 kept of 4


REFUSALS = [
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16}\n", "modifier GPTQModifier is not supported"),
    ("SparseGPTModifier: {sparsity: 0.5, percdamp: 0.01, ignore: [lm_head]}\n", "setting percdamp is not supported"),
    ("SparseGPTModifier: {sparsity: 0.5}\n", "without ignoring lm_head"),
    ("WandaPruningModifier: {sparsity: 0.5, sparsity_profile: owl, ignore: [lm_head]}\n", "owl_m and owl_lmbda"),
    ("MagnitudePruningModifier: {init_sparsity: 0.1, final_sparsity: 0.5, targets: ['re:.*weight']}\n",
     "is a schedule over training"),
    ("SparseGPTModifier: {sparsity: [0.5, 0.6], ignore: [lm_head]}\n", "sparsity per layer"),
    ("SparseGPTModifier: {sparsity: 0.5, preserve_sparsity_mask: true, ignore: [lm_head]}\n",
     "preserve_sparsity_mask"),
    ("s_stage:\n  run_type: train\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5}\n", "run_type train"),
    ("WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head]}\nSparseGPTModifier: {sparsity: 0.5, ignore: [lm_head]}\n",
     "holds 2 pruning modifiers"),
]


@pytest.mark.parametrize("text,message", REFUSALS)
def test_refusals_name_what_is_not_supported(text, message):
    with pytest.raises(PrunekitError, match=re.escape(message)):
        translate(yaml.safe_load(text))

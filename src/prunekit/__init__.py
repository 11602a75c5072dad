"""prunekit: prune neural networks end to end (weights, structure, tokens, training data) and measure it."""

__version__ = "0.1.0"

from prunekit.api import (LoadedModel, evaluate_perplexity, load, load_model, prune, save, save_compressed,  # noqa: E402
                          save_dense)
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.weights.recipe import WeightPruningRecipe as Recipe  # noqa: E402

__all__ = ["LoadedModel", "PrunekitError", "Recipe", "__version__", "evaluate_perplexity", "load", "load_model",
           "prune", "save", "save_compressed", "save_dense"]

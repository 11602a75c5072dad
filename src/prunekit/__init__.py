"""prunekit: prune neural networks end to end (weights, structure, tokens, training data) and measure it."""

__version__ = "0.1.0"

import os as _os

# torch's OpenMP threads (GNU libgomp) spin for a while at every barrier before they sleep. Beside another
# busy process that turned `--threads 2` into a spinning thread holding the core its partner needed:
# SparseGPT on a tiny model took 12 s instead of 1 s. Sleeping at once gives back what is not used, so
# N threads are N busy threads (benchmarks/threads_contention.py). The runtime reads this once, when
# torch is first imported: a value the user set, or an earlier torch import, wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prunekit.api import (LoadedModel, evaluate_perplexity, load, load_model, prune, save, save_compressed,  # noqa: E402
                          save_dense)
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.weights.recipe import WeightPruningRecipe as Recipe  # noqa: E402

__all__ = ["LoadedModel", "PrunekitError", "Recipe", "__version__", "evaluate_perplexity", "load", "load_model",
           "prune", "save", "save_compressed", "save_dense"]

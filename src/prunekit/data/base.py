"""What a data-pruning score and a selection strategy are, and the registries that name them.

A score gives every training example one number. ``harder`` says which end of the scale holds
the hard (informative, rare, possibly mislabelled) examples, so that selection can speak of
"hardest" and "easiest" whatever the score's natural sign. Scores come in two kinds:

* *proxy* scores read a short training run of a small model (EL2N, GraNd, forgetting, AUM, VoG,
  loss/confidence/entropy after training, prototypes on the proxy's features): ``attach`` hooks
  them into one :class:`~prunekit.data.proxy.ProxyRun`, so one run per seed gathers them all;
* *pass* scores need only one pass over the data (perplexity under a reference LM, prototypes on
  a given encoder, random): ``compute`` runs it, data-parallel across processes.

Scores and strategies are ``Method``s: their settings are pydantic fields, validated when
``SCORES.build`` / ``STRATEGIES.build`` makes them. A score's ``needs`` (vocabulary: ``DATA_NEEDS``)
says which kind it is, and whether it needs labels; the scoring pipeline reads that, never a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from prunekit.core.method import Method
from prunekit.core.registry import Registry

if TYPE_CHECKING:
    from prunekit.data.proxy import ProxyRun
    from prunekit.data.scoring import ScoringContext

SCORES: Registry[type["Score"]] = Registry("data score", ("prunekit.data.scores",))
STRATEGIES: Registry[type["Strategy"]] = Registry("selection strategy", ("prunekit.data.strategies",))

HIGHER, LOWER = "higher", "lower"

# What a data score may need from the scoring pipeline, and what that means.
DATA_NEEDS: dict[str, str] = {
    "labels": "the examples' class labels",
    "proxy_model": "a proxy model's outputs on every example at one point (after its short training, or at an epoch)",
    "proxy_training": "the proxy's training as it happens (every step, or several checkpoints)",
    "reference_model": "a pretrained model of its own (a reference language model, a sentence encoder)",
}
PROXY_NEEDS = frozenset({"proxy_model", "proxy_training"})


class Score(Method):
    """One way to rank training examples; the pydantic fields are its settings.

    ``needs`` says what it reads: labels, a proxy run (``attach`` hooks into one) or else one pass
    over the data (``compute``), a reference model of its own.
    """

    summary: ClassVar[str]
    harder: ClassVar[str] = HIGHER

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.needs) - set(DATA_NEEDS))
        if unknown:  # a typo in a declaration would otherwise be a need the pipeline never provides
            raise TypeError(f"{cls.__name__} needs '{unknown[0]}', which is not one of: {', '.join(DATA_NEEDS)}")

    def uses_proxy(self, context: "ScoringContext") -> bool:
        """True when the score reads proxy runs on this data (then ``attach`` is used, else ``compute``)."""
        return bool(self.needs & PROXY_NEEDS)

    def epochs_needed(self, proxy_epochs: int) -> int:
        """How many proxy epochs must have run before the score has all it reads."""
        return proxy_epochs

    def attach(self, run: "ProxyRun") -> Callable[[], np.ndarray]:
        """Hook into one proxy run; the returned function gives the per-example scores once it ends."""
        raise NotImplementedError(f"{self.name} is not a proxy score")

    def compute(self, context: "ScoringContext") -> np.ndarray:
        """Scores of every example from one pass over the data (collective across processes)."""
        raise NotImplementedError(f"{self.name} needs a proxy run")

    def finish(self, per_seed: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Combine the runs of several seeds (rows) into one score per example; the papers average."""
        return per_seed.mean(axis=0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "harder": self.harder, "needs_labels": "labels" in self.needs,
                "needs": sorted(self.needs), "settings": self.model_dump(mode="json")}


class Strategy(Method):
    """Chooses ``count`` examples from hardness values (higher = harder), reproducibly from ``rng``."""

    summary: ClassVar[str]

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (into ``hardness``) of the kept examples."""
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """What the last ``choose`` decided beyond its settings (e.g. an adjusted cut), for reports."""
        return {}


def oriented(values: np.ndarray, harder: str) -> np.ndarray:
    """Hardness: the score turned so that higher always means harder."""
    values = np.asarray(values, dtype=np.float64)
    return values if harder == HIGHER else -values

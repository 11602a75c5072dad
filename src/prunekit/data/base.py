"""What a data-pruning score and a selection strategy are, and the registries that name them.

A score gives every training example one number. ``harder`` says which end of the scale holds
the hard (informative, rare, possibly mislabelled) examples, so that selection can speak of
"hardest" and "easiest" whatever the score's natural sign. Scores come in two kinds:

* *proxy* scores read a short training run of a small model (EL2N, GraNd, forgetting, AUM, VoG,
  loss/confidence/entropy after training, prototypes on the proxy's features): ``attach`` hooks
  them into one :class:`~prunekit.data.proxy.ProxyRun`, so one run per seed gathers them all;
* *pass* scores need only one pass over the data (perplexity under a reference LM, prototypes on
  a given encoder, random): ``compute`` runs it, data-parallel across processes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from prunekit.core.registry import Registry
from prunekit.errors import PrunekitError

if TYPE_CHECKING:
    from prunekit.data.proxy import ProxyRun
    from prunekit.data.scoring import ScoringContext

SCORES: Registry[type["Score"]] = Registry("data score", ("prunekit.data.scores",))
STRATEGIES: Registry[type["Strategy"]] = Registry("selection strategy", ("prunekit.data.strategies",))

HIGHER, LOWER = "higher", "lower"


@dataclasses.dataclass
class Score:
    """One way to rank training examples; the dataclass fields are its settings."""

    name: ClassVar[str]
    summary: ClassVar[str]
    harder: ClassVar[str] = HIGHER
    needs_labels: ClassVar[bool] = True

    def uses_proxy(self, context: "ScoringContext") -> bool:
        """True when the score reads proxy training runs (then ``attach`` is used, else ``compute``)."""
        return True

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

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "harder": self.harder,
                "needs_labels": self.needs_labels, "settings": self.settings()}


@dataclasses.dataclass
class Strategy:
    """Chooses ``count`` examples from hardness values (higher = harder), reproducibly from ``rng``."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (into ``hardness``) of the kept examples."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def notes(self) -> dict[str, Any]:
        """What the last ``choose`` decided beyond its settings (e.g. an adjusted cut), for reports."""
        return {}


def build(registry: Registry, name: str, settings: dict[str, Any] | None = None):
    """Instantiate a registered score or strategy by name with keyword settings, validating them."""
    cls = registry.get(name)
    settings = dict(settings or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        choices = ", ".join(sorted(known)) or "none"
        raise PrunekitError(f"{registry.kind} '{cls.name}' has no setting {', '.join(unknown)}; its settings: {choices}")
    for key, value in list(settings.items()):
        settings[key] = _coerce(value, known[key], f"{cls.name}.{key}")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as exc:
        raise PrunekitError(f"{registry.kind} '{cls.name}': {exc}") from None


def _coerce(value: Any, field: dataclasses.Field, where: str) -> Any:
    """Settings arrive from the command line as YAML scalars; check them against the field's default."""
    default = field.default
    if default is dataclasses.MISSING or default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise PrunekitError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrunekitError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunekitError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise PrunekitError(f"{where} must be a string, got {value!r}")
    return value


def oriented(values: np.ndarray, harder: str) -> np.ndarray:
    """Hardness: the score turned so that higher always means harder."""
    values = np.asarray(values, dtype=np.float64)
    return values if harder == HIGHER else -values

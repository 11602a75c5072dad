"""The settings of a one-shot weight pruning job, validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.allocation import get_allocation
from prunekit.core.config import RecipeModel, TextDataConfig
from prunekit.core.patterns import SparsityPattern, check_sparsity
from prunekit.errors import PrunekitError
from prunekit.weights.base import get_method

DEFAULT_RATIO = 0.5
DEFAULT_SPARSITY = DEFAULT_RATIO  # the name before "ratio"


class PruneSettings(RecipeModel):
    """How one-shot pruning removes weights: every setting of ``prune_weights``, validated up front."""

    renamed: ClassVar[dict[str, str]] = {"sparsity": "ratio"}

    method: dict[str, Any] = Field(default_factory=lambda: {"name": "wanda"})
    ratio: float | None = Field(None, description=f"fraction of the targeted weights removed; default "
                                                  f"{DEFAULT_RATIO} or the pattern's")
    pattern: str = "unstructured"
    allocation: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})
    overrides: dict[str, float] = Field(default_factory=dict, description="layer-name pattern -> ratio")
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    untie_embeddings: bool = False
    sequential: Literal["layer", "block"] = "layer"
    batch_size: int = Field(4, ge=1)
    blocks: str | None = Field(None, description="the model's list of blocks, where structure cannot tell "
                                                 "(e.g. model.layers)")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> dict[str, Any]:
        return get_method(value).settings()

    @field_validator("allocation", mode="before")
    @classmethod
    def _allocation(cls, value: Any) -> dict[str, Any]:
        return get_allocation(value).settings()

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        return str(SparsityPattern.parse(value))

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        return {k: check_sparsity(v, f"override for '{k}'") for k, v in value.items()}

    @model_validator(mode="after")
    def _resolve_ratio(self) -> "PruneSettings":
        pattern = SparsityPattern.parse(self.pattern)
        if self.ratio is not None:
            check_sparsity(self.ratio, "ratio")
        if pattern.is_nm:
            if self.ratio is not None and abs(self.ratio - pattern.sparsity) > 1e-9:
                raise PrunekitError(f"ratio {self.ratio} conflicts with pattern {pattern}, which removes "
                                    f"{pattern.sparsity:.0%}; leave the ratio out")
            if self.allocation["name"] != "uniform":
                raise PrunekitError(f"pattern {pattern} fixes every layer's ratio; "
                                    f"allocation '{self.allocation['name']}' does not apply")
        return self

    @property
    def effective_ratio(self) -> float:
        pattern = SparsityPattern.parse(self.pattern)
        if pattern.is_nm:
            return pattern.sparsity
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    def pruning(self) -> "PruneSettings":
        """Only the pruning settings (what ``prune_weights`` takes), of this or a job's recipe."""
        return PruneSettings.model_validate({k: getattr(self, k) for k in PruneSettings.model_fields})


class WeightPruningRecipe(PruneSettings):
    """Everything ``prunekit prune`` does, as data."""

    model: str | None = Field(None, description="model directory or hub id; None = the embedded SmolLM2-135M")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    evaluate: bool = True
    save_dense: bool = True
    save_compressed: bool = True
    codec: Literal["zstd", "none"] = "zstd"
    device: str = "cpu"
    stream: bool = Field(False, description="keep one block in memory at a time and write shards as they finish")
    trust_remote_code: bool = False

    @property
    def effective_sparsity(self) -> float:  # the name before the vocabulary settled on "ratio"
        return self.effective_ratio

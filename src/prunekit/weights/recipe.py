"""The settings of a one-shot weight pruning job, validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.allocation import get_allocation
from prunekit.core.config import RecipeModel, TextDataConfig
from prunekit.core.patterns import SparsityPattern, check_sparsity
from prunekit.errors import PrunekitError
from prunekit.weights.base import get_method

DEFAULT_SPARSITY = 0.5


def _as_spec(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class WeightPruningRecipe(RecipeModel):
    """Everything ``prunekit prune`` does, as data."""

    model: str | None = Field(None, description="model directory or hub id; None = the embedded SmolLM2-135M")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "wanda"})
    sparsity: float | None = Field(None, description=f"target sparsity; default {DEFAULT_SPARSITY} or the pattern's")
    pattern: str = "unstructured"
    allocation: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})
    overrides: dict[str, float] = Field(default_factory=dict, description="layer-name pattern -> sparsity")
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    untie_embeddings: bool = False
    sequential: Literal["layer", "block"] = "layer"
    batch_size: int = Field(4, ge=1)
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    evaluate: bool = True
    save_dense: bool = True
    save_compressed: bool = True
    codec: Literal["zstd", "none"] = "zstd"
    device: str = "cpu"
    stream: bool = Field(False, description="keep one block in memory at a time and write shards as they finish")
    trust_remote_code: bool = False

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> dict[str, Any]:
        method = get_method(_as_spec(value))
        return {"name": method.name, **method.model_dump(by_alias=True)}

    @field_validator("allocation", mode="before")
    @classmethod
    def _allocation(cls, value: Any) -> dict[str, Any]:
        allocation = get_allocation(_as_spec(value))
        return {"name": allocation.name, **allocation.model_dump(by_alias=True)}

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        return str(SparsityPattern.parse(value))

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        return {k: check_sparsity(v, f"override for '{k}'") for k, v in value.items()}

    @model_validator(mode="after")
    def _resolve_sparsity(self) -> "WeightPruningRecipe":
        pattern = SparsityPattern.parse(self.pattern)
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if pattern.is_nm:
            if self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise PrunekitError(f"sparsity {self.sparsity} conflicts with pattern {pattern}, which is "
                                    f"{pattern.sparsity:.0%} sparse; leave the sparsity out")
            if self.allocation["name"] != "uniform":
                raise PrunekitError(f"pattern {pattern} fixes every layer's sparsity; "
                                    f"allocation '{self.allocation['name']}' does not apply")
        return self

    @property
    def effective_sparsity(self) -> float:
        pattern = SparsityPattern.parse(self.pattern)
        if pattern.is_nm:
            return pattern.sparsity
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

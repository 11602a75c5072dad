"""The settings of a one-shot weight pruning job, validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.allocation import get_allocation
from prunekit.core.config import RecipeModel, TextDataConfig, blocks_field
from prunekit.core.patterns import SparsityPattern, check_sparsity
from prunekit.errors import PrunekitError
from prunekit.evaluate.tasks import TaskSettings
from prunekit.weights.base import get_method
from prunekit.weights.lowrank import LowRankSettings

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
    asymmetric: bool = Field(False, description="fit each layer to the dense model's output from the pruned "
                                                "model's inputs (a dense twin of the calibration stream: one more "
                                                "forward pass and one more set of activations); layer order only")
    # 0.1, not SparseGPT's 0.01: the shift is fitted on the calibration tokens and must carry over to others; on
    # SmolLM2 2:4 SparseGPT it gave 77.24 perplexity at 0.01, 66.02 at 0.1, 75.00 at 1.0 (75.30 symmetric)
    asymmetric_dampening: float = Field(0.1, gt=0, description="asymmetric calibration: fraction of the mean input "
                                                               "second moment added to its diagonal when fitting a "
                                                               "layer to the dense outputs (larger = a smaller, "
                                                               "safer shift)")
    batch_size: int = Field(4, ge=1)
    blocks: str | None = blocks_field()
    lowrank: LowRankSettings = Field(default_factory=LowRankSettings,
                                     description="a rank-r correction per pruned layer (weights.lowrank)")

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
        if self.asymmetric and self.sequential != "layer":
            raise PrunekitError("asymmetric calibration pairs every layer's inputs with the dense model's, layer by "
                                "layer; use --sequential layer")
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
    tasks: TaskSettings = Field(default_factory=TaskSettings, description="zero-shot tasks scored before and after")
    format: Literal["prunekit", "compressed-tensors"] = Field(
        "prunekit", description="format of the compressed copy: prunekit's bitmask + zstd (smaller, read by "
                                "prunekit.load) or compressed-tensors (llm-compressor's sparse layout)")
    device: str = "cpu"
    stream: bool = Field(False, description="keep one block in memory at a time and write shards as they finish")
    trust_remote_code: bool = False

    @classmethod
    def from_yaml(cls, path):
        """prunekit's recipe, or an llm-compressor recipe (``weights.llmcompressor_recipe``) read as one."""
        from prunekit.weights.llmcompressor_recipe import read_llmcompressor_recipe

        translated = read_llmcompressor_recipe(path)
        if translated is None:
            return super().from_yaml(path)
        return cls.build(translated, where=f"llm-compressor recipe {path}")

    @property
    def effective_sparsity(self) -> float:  # the name before the vocabulary settled on "ratio"
        return self.effective_ratio

    @model_validator(mode="after")
    def _stream_lowrank(self) -> "WeightPruningRecipe":
        if self.stream and self.lowrank.enabled:
            raise PrunekitError("the low-rank correction is fitted in memory; leave out --stream or --lowrank-budget")
        return self

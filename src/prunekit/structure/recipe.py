"""The settings of a structural pruning job (``prunekit shrink``), validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.allocation import get_allocation
from prunekit.core.allocation.search import MEASUREMENT
from prunekit.core.config import RecipeModel, TextDataConfig, blocks_field
from prunekit.errors import PrunekitError
from prunekit.structure.allocation import WidthAllocation, check_ratio, check_search_combination
from prunekit.structure.importance.base import get_importance
from prunekit.structure.pipeline import WidthSettings, resolve_granularity
from prunekit.structure.reconstruct import DEFAULT_DAMPING
from prunekit.structure.shrink_method import get_shrink_method
from prunekit.training.recovery import FineTunePlan

# Linear warm-up steps of the recovery fine-tune before its cosine decay over the budget.
RECOVERY_WARMUP_STEPS = 10


class DepthConfig(RecipeModel):
    """Whole blocks to remove before any width pruning."""

    blocks: int = Field(0, ge=0, description="number of blocks to remove")
    criterion: Literal["influence", "perplexity", "search"] = "influence"
    windows: int = Field(8, ge=1, description="calibration windows per evaluation (perplexity criterion)")
    search: str | dict[str, Any] = Field("evolutionary", description="search criterion: the measured allocation "
                                         "choosing the blocks together (knapsack or evolutionary, with its settings)")

    @field_validator("search")
    @classmethod
    def _search(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        allocation = get_allocation(value)  # an unknown name or setting is refused here, before any loading
        if MEASUREMENT not in allocation.needs:
            raise PrunekitError(f"depth search: allocation {allocation.name} does not measure the model; "
                                "use knapsack or evolutionary")
        return value


class RecoveryConfig(RecipeModel):
    """A short fine-tune after shrinking, on calibration text."""

    # The plain LM loss at 3e-4 beat distillation (1e-4, 3e-4) in a 600 s budget on SmolLM2 (docs/structure.md).
    mode: Literal["distill", "plain"] = "plain"
    seconds: float | None = Field(600.0, gt=0, description="wall-time budget")
    steps: int | None = Field(None, ge=1, description="step budget (whichever comes first)")
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(1, ge=1)
    samples: int = Field(256, ge=1, description="calibration windows to train on (seeded random offsets)")
    temperature: float = Field(1.0, gt=0)
    train_embeddings: bool = False
    train_only: list[str] = Field(default_factory=list, description="name fragments of the only parameters to "
                                                                    "train (e.g. ['mlp.', 'norm']); others frozen")

    @model_validator(mode="after")
    def _budget(self) -> "RecoveryConfig":
        if self.seconds is None and self.steps is None:
            raise PrunekitError("recovery needs a budget: seconds or steps")
        return self

    def plan(self, seed: int) -> FineTunePlan:
        """The fine-tune of a shrunk model: every parameter but the embedding (or those of ``train_only``)."""
        return FineTunePlan(objective=self.mode, update="full", steps=self.steps, seconds=self.seconds, lr=self.lr,
                            batch_size=self.batch_size, warmup_steps=RECOVERY_WARMUP_STEPS,
                            temperature=self.temperature, train_embeddings=self.train_embeddings,
                            train_only=tuple(self.train_only), seed=seed)


class MeasureConfig(RecipeModel):
    """How speed is measured before and after."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])
    seq_len: int = Field(128, ge=1, description="tokens per sequence in the speed runs")
    runs: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    threads: int = Field(2, ge=1)
    memory: bool = Field(True, description="peak inference memory at the largest batch, each model in a fresh "
                                           "process")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch sizes must be positive")
        return sorted(set(value))


class ShrinkRecipe(RecipeModel):
    """Everything ``prunekit shrink`` does, as data."""

    model: str | None = Field(None, description="model directory or hub id; None = the embedded SmolLM2-135M")
    blocks: str | None = blocks_field()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    ratio: float = Field(0.2, description="fraction of the model's parameters (or MACs) removed by width pruning")
    target: Literal["params", "macs"] = "params"
    method: dict[str, Any] | None = Field(None, description="unset: delete coupled units ranked by the importance "
                                                             "criterion; or a method that changes the basis "
                                                             "(svd-llm, slicegpt) and its settings")
    granularity: list[str] = Field(default_factory=lambda: ["channels", "heads"])
    heads: Literal["kv", "query"] = Field("kv", description="grouped-query heads: remove whole KV groups, or "
                                                           "query heads equally from every group")
    importance: dict[str, Any] | None = Field(None, description="criterion and its settings; unset: fisher for "
                                                                  "causal language models (they have a loss), flap "
                                                                  "for encoders")
    allocation: WidthAllocation = Field(default_factory=WidthAllocation)
    overrides: dict[str, float] = Field(default_factory=dict, description="family/module pattern -> removed fraction")
    ignore: list[str] = Field(default_factory=list, description="family/module patterns left whole")
    reconstruct: bool = Field(False, description="refit the layers reading removed units by least squares on the "
                                                 "calibration data (replaces FLAP's bias compensation)")
    reconstruct_damping: float = Field(DEFAULT_DAMPING, gt=0, le=100,
                                       description="ridge of the refit towards the unpruned weights, relative to "
                                                   "the mean diagonal of the calibration Gram matrix")
    depth: DepthConfig = Field(default_factory=DepthConfig)
    recovery: RecoveryConfig | None = None
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    lenient: bool = Field(False, description="leave the channels around an operation the tracer does not know "
                                              "unpruned instead of failing")
    evaluate: bool = True
    onnx: bool = False
    batch_size: int = Field(4, ge=1)
    trust_remote_code: bool = False

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        return check_ratio(value)

    @field_validator("importance", mode="before")
    @classmethod
    def _importance(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        importance = get_importance({"name": value} if isinstance(value, str) else value)
        return importance.settings()

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> dict[str, Any] | None:
        return None if value is None else get_shrink_method(value).settings()

    @field_validator("allocation", mode="before")
    @classmethod
    def _allocation(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("granularity", mode="before")
    @classmethod
    def _granularity(cls, value: Any) -> list[str]:
        return resolve_granularity(value)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        return {k: check_ratio(v, f"override for '{k}'") for k, v in value.items()}

    def with_default_importance(self, kind: str) -> "ShrinkRecipe":
        """The recipe with its criterion named (so reports and recipe.yaml name it): unset, fisher for causal
        language models (they have a loss), flap for encoders."""
        if self.importance is not None or self.method is not None:
            return self
        default = "fisher" if kind == "causal-lm" else "flap"
        return self.model_copy(update={"importance": get_importance(default).settings()})

    def width_settings(self) -> WidthSettings:
        """The plan ``prune_structure`` follows, built once from this recipe (its criterion named)."""
        if self.importance is None:
            raise PrunekitError("the recipe names no importance criterion yet (with_default_importance names one)")
        return WidthSettings(ratio=self.ratio, importance=self.importance, granularity=tuple(self.granularity),
                             target=self.target, allocation=self.allocation, head_mode=self.heads,
                             ignore=tuple(self.ignore), overrides=self.overrides, seed=self.data.seed,
                             strict=not self.lenient, reconstruct=self.reconstruct, damping=self.reconstruct_damping)

    @model_validator(mode="after")
    def _something_to_do(self) -> "ShrinkRecipe":
        if self.ratio == 0 and self.depth.blocks == 0:
            raise PrunekitError("nothing to prune: give a ratio above 0 or a number of blocks to remove")
        if self.method is not None and self.target != "params":
            raise PrunekitError(f"{self.method['name']} removes a fraction of the parameters; leave out --target macs")
        if self.allocation.searched:
            if self.method is not None:
                raise PrunekitError(f"allocation {self.allocation.name} chooses how many units each family keeps; "
                                    f"{self.method['name']} deletes none: leave out one of them")
            compensation = self.importance is not None and get_importance(self.importance).compensation()
            check_search_combination(self.allocation, self.reconstruct, self.overrides, compensation)
        return self


class ShrinkGraphRecipe(RecipeModel):
    """What ``prunekit shrink-graph`` traces: the model, how grouped-query heads form units, strictness."""

    model: str | None = Field(None, description="model directory or hub id; None = the embedded SmolLM2-135M")
    blocks: str | None = blocks_field()
    heads: Literal["kv", "query"] = Field("kv", description="grouped-query heads: whole KV groups, or query heads "
                                                           "equally from every group")
    lenient: bool = Field(False, description="leave the channels around an operation the tracer does not know "
                                              "unpruned instead of failing")
    trust_remote_code: bool = False

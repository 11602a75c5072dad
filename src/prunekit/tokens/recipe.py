"""The settings of ``prunekit tokens eval``, validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.config import RecipeModel, blocks_field
from prunekit.tokens.base import METHODS


class TokensEvalRecipe(RecipeModel):
    """Token reduction methods applied at several ratios to one model, each measured against the unpatched
    model: quality, throughput (timed in pairs with the unpatched model) and FLOPs."""

    renamed: ClassVar[dict[str, str]] = {"rates": "ratios"}

    model: str = Field(description="fashion-vit, minilm, smollm2, a prunekit ViT directory, or a Hugging Face ViT / "
                                   "BERT-style / Llama-style model directory")
    blocks: str | None = blocks_field()
    methods: list[dict[str, Any]] = Field(default_factory=lambda: METHODS.sweep_entries("tome"), min_length=1,
                                          description="methods with their settings (the ratio aside)")
    ratios: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3], min_length=1,
                                description="fractions of the reducible tokens each reducing layer removes")
    layers: list[int] | None = Field(None, description="blocks that reduce [default: each method's own]")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1, description="batch sizes to time")
    warmup: int = Field(3, ge=0, description="untimed warm-up pairs")
    repeats: int = Field(10, ge=1, description="timed pairs; medians are reported")
    samples: int | None = Field(None, ge=1, description="evaluation size: images (default all 10000), passages "
                                                        "(default 256) or prefill windows (default 16)")
    prompt_tokens: int = Field(384, ge=2, description="prefill: prompt length")
    continuation_tokens: int = Field(128, ge=2, description="prefill: continuation length")
    seed: int = Field(0, description="seed of the random method")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        None, description="Hugging Face models: sdpa or eager [default: the library's choice]")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> list[dict[str, Any]]:
        return METHODS.sweep_entries(value, aliases=("rate",))

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError("batch sizes must be positive")
        return value

    @model_validator(mode="after")
    def _every_method_at_every_ratio(self) -> "TokensEvalRecipe":
        for spec in self.methods:  # checked before any model is loaded
            for ratio in self.ratios:
                METHODS.build(spec, ratio=ratio)
        return self

    @property
    def method_names(self) -> list[str]:
        return [spec["name"] for spec in self.methods]

    def options(self) -> dict[str, dict[str, Any]]:
        """Each method's settings but its name (what ``run_sweep`` passes to ``apply``)."""
        return {spec["name"]: {k: v for k, v in spec.items() if k != "name"} for spec in self.methods}

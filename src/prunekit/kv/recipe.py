"""The settings of ``prunekit kv eval``, validated up front and round-tripped to YAML."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.config import RecipeModel
from prunekit.errors import PrunekitError
from prunekit.kv.base import METHODS
from prunekit.kv.budget import ALLOCATIONS

DEFAULT_METHODS = ("snapkv", "knorm", "streaming_llm", "tova", "expected_attention")


class KVEvalRecipe(RecipeModel):
    """KV-cache compression methods at several ratios on one causal language model, each measured against the
    full cache: long-context perplexity, needle retrieval, cache bytes, peak memory, prefill and decoding speed."""

    model: str = Field(description="smollm2 or a Hugging Face causal language model directory")
    methods: list[dict[str, Any]] = Field(default_factory=lambda: METHODS.sweep_entries(list(DEFAULT_METHODS)),
                                          min_length=1, description="methods with their settings (the ratio aside)")
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9], min_length=1,
                                description="fractions of the prompt's cached entries removed")
    allocation: Literal["uniform", "adaptive", "pyramid"] = Field(
        "uniform", description="budget over a block's key heads or over the blocks: " + ", ".join(ALLOCATIONS))
    decode_budget: int | None = Field(None, ge=2, description="entries per key head kept while decoding "
                                                                  "[default: no budget]")
    decode_every: int = Field(16, ge=1, description="decoding steps between compressions under the budget")
    zero_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of every cached key and value vector "
                                                             "zeroed (smallest magnitudes)")
    question: Literal["aware", "agnostic"] = Field("aware", description="needle: the question ends the compressed "
                                                                       "prompt (aware) or follows it (agnostic)")
    prompt_tokens: int = Field(2048, ge=64, description="compressed prefix / needle prompt length")
    continuation_tokens: int = Field(256, ge=2, description="tokens scored after the prefix")
    windows: int = Field(4, ge=1, description="wiki articles scored for perplexity")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
                                description="needle depths: the fraction of the haystack before the needle")
    decode_tokens: int = Field(32, ge=2, description="greedy tokens timed for decoding speed")
    warmup: int = Field(1, ge=0, description="untimed warm-up pairs")
    repeats: int = Field(3, ge=1, description="timed pairs; medians are reported")
    seed: int = Field(0, description="seed of the needles and of the random method")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernels: sdpa or eager")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> list[dict[str, Any]]:
        return METHODS.sweep_entries(value)

    @field_validator("depths")
    @classmethod
    def _depths(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= depth <= 1.0 for depth in value):
            raise ValueError("needle depths are fractions of the haystack, in [0, 1]")
        return value

    @model_validator(mode="after")
    def _every_method_at_every_ratio(self) -> "KVEvalRecipe":
        for spec in self.methods:  # checked before any model is loaded
            for ratio in self.ratios:
                method = METHODS.build(spec, ratio=ratio)
                if method.window() >= self.prompt_tokens:
                    raise PrunekitError(f"{method.name} reads the prompt's last {method.window()} tokens; give "
                                        f"--prompt-tokens above that, got {self.prompt_tokens}")
                floor = max(method.window(), method.recent_queries()) + 1
                if self.decode_budget is not None and self.decode_budget < floor:
                    raise PrunekitError(f"--decode-budget must be at least {floor} entries for {method.name} (it "
                                        f"keeps its last {floor - 1} tokens); got {self.decode_budget}")
        if self.decode_budget is not None and self.allocation != "uniform":
            raise PrunekitError("a decoding budget keeps every head at the same count; use --allocation uniform")
        return self

    def protocol(self):
        from prunekit.kv.evaluation import KVProtocol

        return KVProtocol(prompt_tokens=self.prompt_tokens, continuation_tokens=self.continuation_tokens,
                          windows=self.windows, depths=tuple(self.depths), question=self.question,
                          decode_tokens=self.decode_tokens, warmup=self.warmup, repeats=self.repeats, seed=self.seed)

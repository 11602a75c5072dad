"""The job behind ``prunekit kv eval``: kv-cache compression methods at several ratios on one causal language
model, measured against the full cache (``prunekit.kv.evaluation``). ``evaluate.outcome.execute`` writes
``report.json``, ``report.md`` and ``recipe.yaml``; the job adds the plot of quality against cache size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.core.job import Job, Outcome
from prunekit.errors import PrunekitError
from prunekit.kv.recipe import KVEvalRecipe

PLOT = "quality_vs_cache.png"


class KVEvalJob(Job[KVEvalRecipe]):
    command = "kv eval"
    recipe_type = KVEvalRecipe

    def __init__(self, recipe: KVEvalRecipe, threads: int | None = None):
        super().__init__(recipe)
        self.threads = threads


    def run(self) -> Outcome:
        from prunekit.core.progress import console
        from prunekit.kv.evaluation import SweepSettings, run_sweep, sweep_markdown
        from prunekit.kv.patch import find_attentions
        from prunekit.models.loading import load_model

        recipe = self.recipe
        loaded = load_model(recipe.model, kind="causal-lm", attn_implementation=recipe.attn_implementation)
        limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        length = recipe.prompt_tokens + max(recipe.continuation_tokens, recipe.decode_tokens)
        if isinstance(limit, int) and length > limit:
            raise PrunekitError(f"--prompt-tokens {recipe.prompt_tokens} and the tokens after it ({length} in all) "
                                f"exceed the {limit} positions of {loaded.name}")
        find_attentions(loaded.model)  # an attention the adapter cannot read is refused before any measurement
        settings = SweepSettings(methods=list(recipe.methods), ratios=list(recipe.ratios),
                                 allocation=recipe.allocation, protocol=recipe.protocol(),
                                 decode_budget=recipe.decode_budget, decode_every=recipe.decode_every,
                                 zero_ratio=recipe.zero_ratio,
                                 progress=lambda message: console.print(f"kv eval: {message}"))
        result = run_sweep(loaded.model, loaded.require_tokenizer(), settings)
        result["model"] = {"name": loaded.name}
        self.title = f"KV-cache compression on {loaded.name}"
        markdown = sweep_markdown(result, self.title) + f"\n![quality against cache size]({PLOT})\n"
        return Outcome(result, markdown, summary_rows(result), self.title)

    def write(self, directory: Path, outcome: Outcome) -> None:
        from prunekit.kv.evaluation import plot_sweep

        plot_sweep(outcome.report, directory / PLOT, self.title)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    base = result["baseline"]
    rows = [("full cache", f"perplexity {base['perplexity']:.4g}, needle {base['needle_exact_match']:.0%}")]
    for point in result["points"]:
        rows.append((f"{point['method']} at ratio {point['ratio']:g}",
                     f"perplexity {point['perplexity']:.4g} ({point['perplexity_change']:+.1%}), needle "
                     f"{point['needle_exact_match']:.0%}, cache ×{point['cache_bytes'] / point['full_cache_bytes']:.2f}, "
                     f"decode {point['decode_speedup']:.2f}×"))
    return rows

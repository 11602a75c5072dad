"""The job behind ``prunekit tokens eval``: methods at several ratios on one model, measured against it.

Every setting is checked before the model is loaded (``TokensEvalRecipe``); what only the model can
tell (its kind, its image shape, its position limit, its depth for ``layers``) is checked before any
measurement. ``evaluate.outcome.execute`` writes ``report.json``, ``report.md`` and ``recipe.yaml``;
the job adds the plot of quality against measured throughput.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunekit.core.job import Job, Outcome
from prunekit.errors import PrunekitError
from prunekit.tokens.recipe import TokensEvalRecipe

# How each kind of model is measured: prunekit evaluates token reduction on one task per kind.
TASKS = {"image-classifier": "image", "encoder": "embedding", "causal-lm": "prefill"}
PLOT = "quality_vs_throughput.png"


def check_fashion_mnist_shape(loaded) -> None:
    """Image classifiers are measured on Fashion-MNIST: 28×28 images, 1 channel, 10 classes."""
    config = getattr(loaded.model, "config", None)
    if config is None:
        return  # prunekit's own ViT, trained on Fashion-MNIST
    shape = (getattr(config, "image_size", None), getattr(config, "num_channels", None), config.num_labels)
    if shape != (28, 1, 10):
        raise PrunekitError(f"{loaded.name} takes {shape[0]}×{shape[0]} images with {shape[1]} channels and "
                            f"{shape[2]} classes; prunekit evaluates image classifiers on Fashion-MNIST (28×28, "
                            "1 channel, 10 classes)")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model has positions for (None when its config does not say).

    RoBERTa-style embeddings number positions from ``padding_idx + 1``, so they hold that many fewer.
    """
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in model.named_modules():
        if ("position" in name and isinstance(module, nn.Embedding) and module.num_embeddings == limit
                and module.padding_idx is not None):
            return limit - module.padding_idx - 1
    return limit


def check_sequence_length(loaded, recipe: TokensEvalRecipe, task_kind: str) -> None:
    """Refuse sequences longer than the model has positions for, before any forward pass indexes past them."""
    from prunekit.tokens.evaluation import PassageProtocol

    limit = position_limit(loaded.model)
    if limit is None:
        return
    if task_kind == "prefill":
        length = recipe.prompt_tokens + recipe.continuation_tokens
        if length > limit:
            raise PrunekitError(f"--prompt-tokens {recipe.prompt_tokens} + --continuation-tokens "
                                f"{recipe.continuation_tokens} = {length} tokens exceed the {limit} positions of "
                                f"{loaded.name}; give at most {limit} in all")
    elif task_kind == "embedding" and PassageProtocol.max_tokens > limit:
        raise PrunekitError(f"the passages of the embedding protocol reach {PassageProtocol.max_tokens} tokens, "
                            f"beyond the {limit} positions of {loaded.name}")


class TokensEvalJob(Job[TokensEvalRecipe]):
    """Measure the unpatched model, then every method at every ratio (``tokens.evaluation.run_sweep``)."""

    command = "tokens eval"
    recipe_type = TokensEvalRecipe

    def __init__(self, recipe: TokensEvalRecipe, threads: int | None = None):
        super().__init__(recipe)
        self.threads = threads


    def _task(self, loaded, task_kind: str):
        from prunekit.tokens.evaluation import (ImageClassification, ImageProtocol, PassageProtocol, Prefill,
                                                PrefillProtocol, TextEmbedding)

        recipe = self.recipe
        if task_kind == "image":
            return ImageClassification.fashion_mnist(ImageProtocol(limit=recipe.samples))
        if task_kind == "embedding":
            return TextEmbedding.wiki(loaded.require_tokenizer(), PassageProtocol(count=recipe.samples or 256))
        return Prefill.wiki(loaded.require_tokenizer(),
                            PrefillProtocol(prompt_tokens=recipe.prompt_tokens,
                                            continuation_tokens=recipe.continuation_tokens,
                                            windows=recipe.samples or 16))

    def run(self) -> Outcome:
        from prunekit.models.loading import load_model
        from prunekit.tokens import find_family, get_method
        from prunekit.tokens.evaluation import SweepSettings, run_sweep, sweep_markdown
        from prunekit.tokens.patch import resolve_layers

        recipe = self.recipe
        loaded = load_model(recipe.model, attn_implementation=recipe.attn_implementation)
        if recipe.blocks:
            from prunekit.models import adapter_for

            adapter_for(loaded.model, blocks=recipe.blocks)  # --blocks holds for the token family's adapter
        task_kind = TASKS.get(loaded.kind)
        if task_kind is None:
            raise PrunekitError(f"{loaded.name} is a {loaded.kind}; token reduction evaluates image classifiers, "
                                "text encoders and causal language models")
        if task_kind == "image":
            check_fashion_mnist_shape(loaded)
        check_sequence_length(loaded, recipe, task_kind)
        family = find_family(loaded.model)
        for spec in recipe.methods:
            method = get_method(spec, recipe.ratios[0])
            family.check(method)
            resolve_layers(method, recipe.layers, family.depth)
        task = self._task(loaded, task_kind)
        settings = SweepSettings(methods=recipe.method_names, ratios=list(recipe.ratios),
                                 batch_sizes=list(recipe.batch_sizes), warmup=recipe.warmup, repeats=recipe.repeats,
                                 layers=recipe.layers, seed=recipe.seed, options=recipe.options(),
                                 threads=self.threads)
        result = run_sweep(loaded.model, task, settings)
        result["model"] = {"name": loaded.name, "family": family.name}
        self.title = f"Token reduction on {loaded.name}"
        markdown = sweep_markdown(result, self.title) + f"\n![quality against measured throughput]({PLOT})\n"
        return Outcome(result, markdown, summary_rows(result), self.title)

    def write(self, directory: Path, outcome: Outcome) -> None:
        from prunekit.tokens.evaluation import plot_sweep

        plot_sweep(outcome.report, directory / PLOT, self.title)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """One line for the unpatched model and one for each method at each ratio, at the largest batch timed."""
    metric = result["metric"]
    base = result["baseline"]
    size = list(base["throughput"])[-1]
    rows = [("unpatched", f"{metric} {base['quality'][metric]:.4g}, "
                          f"{base['throughput'][size]['items_per_second']:.1f} items/s (batch {size}), "
                          f"{base['flops_per_item'] / 1e9:.4g} GFLOPs/item")]
    for point in result["points"]:
        rows.append((f"{point['method']} at ratio {point['ratio']:g}",
                     f"{metric} {point['quality'][metric]:.4g} ({point['quality_change']:+.4g}), "
                     f"speed-up {point['speedup'][size]:.2f}× (batch {size}), FLOPs ×{point['flops_ratio']:.3f}"))
    return rows

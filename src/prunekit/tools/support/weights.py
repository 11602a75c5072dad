"""One-shot weight pruning: Wanda 50 % and SparseGPT 2:4 end to end on an architecture."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from prunekit.core.masks import is_valid_nm
from prunekit.core.patterns import SparsityPattern
from prunekit.errors import PrunekitError
from prunekit.tools.support import ModelFactory, SupportResult, one_line


def _check_layers(result, pattern: SparsityPattern, sparsity: float, model) -> str | None:
    """Every layer holds what the method promises: the N:M pattern exactly, or the sparsity to within one
    weight per row (the rounding of a row's count)."""
    weights = {name: param for name, param in model.named_parameters()}
    from prunekit.models import adapter_for
    from prunekit.weights.pipeline import select_targets

    targets = {t.name: t for t in select_targets(model, adapter_for(model))}
    for layer in result.layers:
        target = targets[layer.name]
        weight = target.weight
        if pattern.is_nm:
            if not is_valid_nm(weight != 0, pattern):
                return f"{layer.name} breaks the {pattern} pattern"
        elif abs(layer.achieved_sparsity - sparsity) > 1.0 / weight.shape[1] + 1e-9:
            return f"{layer.name} is {layer.achieved_sparsity:.4f} sparse, not {sparsity}"
    del weights
    return None


def check(factory: ModelFactory, windows: torch.Tensor) -> SupportResult:
    from transformers import AutoModelForCausalLM

    from prunekit.io.checkpoint import save_compressed, save_dense
    from prunekit.models.loading import load
    from prunekit.weights.pipeline import prune_weights

    details = []
    for method, pattern, sparsity in (("wanda", "unstructured", 0.5), ("sparsegpt", "2:4", 0.5)):
        model = factory()
        try:
            result = prune_weights(model, method, None if pattern != "unstructured" else sparsity, pattern=pattern,
                                   calibration=windows, batch_size=2)
        except PrunekitError as exc:
            return SupportResult("refused", f"{method}: {one_line(exc)}")
        problem = _check_layers(result, SparsityPattern.parse(pattern), sparsity, model)
        if problem:
            return SupportResult("broken", f"{method} {pattern}: {problem}")
        with torch.no_grad():
            logits = model(input_ids=windows[:2]).logits
        if not torch.isfinite(logits).all():
            return SupportResult("broken", f"{method} {pattern}: the pruned model's outputs are not finite")
        with tempfile.TemporaryDirectory() as tmp:
            save_dense(model, Path(tmp) / "dense")
            reloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "dense").eval()
            save_compressed(model, Path(tmp) / "compressed")
            restored = load(Path(tmp) / "compressed").eval()
            with torch.no_grad():
                for name, other in (("from_pretrained", reloaded), ("prunekit.load", restored)):
                    if not torch.equal(other(input_ids=windows[:2]).logits, logits):
                        return SupportResult("broken", f"{method} {pattern}: {name} gives other outputs")
        if result.unreached_experts:
            details.append(f"{len(result.unreached_experts)} experts unreached")
        details.append(f"{method} {result.achieved_sparsity:.1%}")
    return SupportResult("yes", ", ".join(details))

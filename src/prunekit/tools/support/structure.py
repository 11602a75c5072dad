"""Structural pruning: ``prunekit shrink`` at 20 % of the parameters end to end on an architecture.

The check runs what the job runs (``prune_structure`` with the job's default granularity, head mode,
allocation and importance: Fisher from the language-model loss for causal LMs, FLAP from activation
statistics for encoders), then verifies the promises of a shrunk model:

- it runs and its outputs are finite;
- it has exactly the parameters the plan counted (plus the compensation biases FLAP creates, which the
  plan reserves room for);
- it computes what the original computes with the removed units zeroed (the exactness property of every
  family marked exact; compensated biases are carried over to the reference), so nothing was removed
  that the graph did not know about and no head count or width attribute was left stale;
- the saved directory loads back (``from_pretrained`` where the saver says the config describes every
  shape, ``prunekit.load`` from the shape spec otherwise) with identical outputs.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_parameters
from prunekit.tools.support import ModelFactory, SupportResult, one_line

RATIO = 0.2
# The shrunk model against the zeroed original: the same sums in another order (float32 of tiny random models).
TOLERANCE = 1e-4


def _missing_biases(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules()
            if "bias" in module._parameters and module._parameters["bias"] is None}


def model_outputs(model: nn.Module, inputs: torch.Tensor, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        if causal:
            return model(input_ids=inputs, use_cache=False).logits
        return model(input_ids=inputs).last_hidden_state


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def zeroed_reference(original: nn.Module, shrunk: nn.Module, result, example, head_mode: str) -> str | nn.Module:
    """``original`` with every removed unit zeroed and the compensated biases of ``shrunk`` carried over, or the
    reason no such reference exists (a removed family is not exact)."""
    from prunekit.models import adapter_for
    from prunekit.models.layout import is_linear_like, linear_shape
    from prunekit.structure.graph import build_graph
    from prunekit.structure.shrink import zero_units

    adapter = adapter_for(original) if getattr(original, "config", None) is not None else None
    graph = build_graph(original, example, adapter=adapter, head_mode=head_mode)
    for name, units in result.plan.removal.items():
        family = graph.family(name)
        if not family.exact:
            return f"{name} is not exact (read by a statistic over channels)"
        zero_units(graph, family, units)
    for name in result.shrink.compensated:
        target, source = original.get_submodule(name), shrunk.get_submodule(name)
        rows = linear_shape(target)[0] if is_linear_like(target) else target.weight.shape[0]
        if rows != source.bias.shape[0]:
            return f"{name} lost output rows and took a compensation bias"
        target.bias = nn.Parameter(source.bias.detach().clone())
    return original


def _verify(model: nn.Module, original: nn.Module, result, example, head_mode: str,
            outputs_of: Callable[[nn.Module], torch.Tensor],
            biases_before: set[str]) -> SupportResult | tuple[torch.Tensor, int, str]:
    """What every shrink must hold, before saving: finite outputs, the planned parameter count (biases the
    shrink had to add counted), and the original's outputs with the removed units zeroed. A failure is the
    ``SupportResult`` saying so; else (outputs, parameters, what was checked of exactness)."""
    model.eval()
    outputs = outputs_of(model)
    if not torch.isfinite(outputs).all():
        return SupportResult("broken", "the shrunk model's outputs are not finite")
    added = sum(model.get_submodule(name).bias.numel() for name in biases_before - _missing_biases(model))
    planned, actual = result.plan.total_after + added, count_parameters(model)
    if actual != planned:
        return SupportResult("broken", f"{actual:,} parameters after shrinking, the plan counted {planned:,}")
    reference = zeroed_reference(original, model, result, example, head_mode)
    if isinstance(reference, str):
        return outputs, actual, f"exactness not checked: {reference}"
    expected = outputs_of(reference.eval())
    difference = float((expected - outputs).abs().max())
    if difference > TOLERANCE * max(1.0, float(expected.abs().max())):
        return SupportResult("broken", f"the shrunk model differs from the original with the removed units zeroed "
                                       f"by {difference:.3g}")
    return outputs, actual, "equals the zeroed original"


def check(factory: ModelFactory, windows: torch.Tensor) -> SupportResult:
    """Shrink a fresh model from ``factory`` by 20 % of its parameters and verify the result.

    ``windows`` (token ids, samples × length) calibrate the importance and are the inputs whose outputs
    are compared.
    """
    import prunekit
    from prunekit.models import adapter_for
    from prunekit.models.loading import CAUSAL_LM, ENCODER
    from prunekit.structure.pipeline import encoder_calibration, lm_calibration, lm_example_inputs, prune_structure
    from prunekit.structure.recipe import ShrinkRecipe
    from prunekit.structure.saving import save_structured

    model = factory().eval()
    original = copy.deepcopy(model)
    causal = is_causal_lm(model)
    recipe = ShrinkRecipe(ratio=RATIO).with_default_importance(CAUSAL_LM if causal else ENCODER)
    settings = recipe.width_settings()
    example = lm_example_inputs() if causal else {"input_ids": torch.arange(1, 5).unsqueeze(0)}
    calibration = (lm_calibration if causal else encoder_calibration)(windows, recipe.batch_size)
    inputs = windows[:2]

    def outputs_of(network: nn.Module) -> torch.Tensor:
        return model_outputs(network, inputs, causal)

    try:
        biases_before = _missing_biases(model)
        result = prune_structure(model, example_inputs=example, settings=settings, calibration=calibration,
                                 adapter=adapter_for(model))
        verified = _verify(model, original, result, example, settings.head_mode, outputs_of, biases_before)
        if isinstance(verified, SupportResult):
            return verified
        outputs, actual, exactness = verified
        with tempfile.TemporaryDirectory() as tmp:
            saved = save_structured(model, tmp, None, adapter_for(model))
            if saved.from_pretrained:
                from transformers import AutoModel, AutoModelForCausalLM

                loader = AutoModelForCausalLM if causal else AutoModel
                reloaded, how = loader.from_pretrained(tmp).eval(), "from_pretrained"
            else:
                reloaded, how = prunekit.load(tmp).eval(), "the shape spec"
            if count_parameters(reloaded) != actual:
                return SupportResult("broken", f"reloaded through {how}, the model has {count_parameters(reloaded):,} "
                                               f"parameters, not {actual:,}")
            if not torch.equal(outputs_of(reloaded), outputs):
                return SupportResult("broken", f"reloaded through {how}, the model gives other outputs")
    except PrunekitError as exc:
        return SupportResult("refused", one_line(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a defect this check exists to report
        return SupportResult("broken", f"{type(exc).__name__}: {one_line(exc)}")
    removed = 1 - actual / result.shrink.parameters_before
    kinds = sorted({family["kind"] for family in result.families if family["name"] in result.plan.removal})
    return SupportResult("yes", f"{removed:.1%} removed as {' and '.join(kinds)}, {exactness}, reloads via {how}")


def check_classifier(factory: ModelFactory, images: torch.Tensor, labels: torch.Tensor) -> SupportResult:
    """Shrink a fresh plain ``nn.Module`` classifier by 20 % of its parameters as whole channels, as
    ``prune_structure`` does by default, and verify it as ``check`` does a transformer: finite outputs,
    the planned parameter count, the original's outputs with the removed channels zeroed, and identical
    outputs after ``save_structured`` → ``prunekit.load(path, model=<unpruned skeleton>)``."""
    import prunekit
    from prunekit.structure.pipeline import WidthSettings, classifier_calibration, prune_structure
    from prunekit.structure.saving import save_structured

    model = factory().eval()
    original = copy.deepcopy(model)
    settings = WidthSettings(ratio=RATIO, granularity=("channels",))
    example = (images[:1],)

    def outputs_of(network: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return network(images)

    try:
        biases_before = _missing_biases(model)
        result = prune_structure(model, example_inputs=example, settings=settings,
                                 calibration=classifier_calibration(images, labels))
        verified = _verify(model, original, result, example, settings.head_mode, outputs_of, biases_before)
        if isinstance(verified, SupportResult):
            return verified
        outputs, actual, exactness = verified
        with tempfile.TemporaryDirectory() as tmp:
            save_structured(model, tmp)
            reloaded = prunekit.load(tmp, model=factory()).eval()
            if count_parameters(reloaded) != actual or not torch.equal(outputs_of(reloaded), outputs):
                return SupportResult("broken", "reloaded from the shape spec, the model differs")
    except PrunekitError as exc:
        return SupportResult("refused", one_line(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a defect this check exists to report
        return SupportResult("broken", f"{type(exc).__name__}: {one_line(exc)}")
    removed = 1 - actual / result.shrink.parameters_before
    return SupportResult("yes", f"{removed:.1%} removed as channels, {exactness}, reloads via the shape spec")

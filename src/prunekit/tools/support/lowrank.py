"""Beyond masks: SVD-LLM and SliceGPT end to end on an architecture (``prunekit shrink --method ...``).

Each method removes 20 % of the parameters; the shrunk model must give finite outputs, hold the planned
parameter count (within the rounding of one rank or one slicing unit), and reload through ``prunekit.load``
with identical outputs. SliceGPT must also leave the model's outputs unchanged, to float tolerance, when it
rotates without slicing (ratio 0), which is what makes its slicing a projection and not a guess.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from prunekit.errors import PrunekitError
from prunekit.tools.support import ModelFactory, SupportResult, one_line

RATIO = 0.2
SLACK = 0.05  # the achieved share may fall short of the ratio by a rounding unit on a 64-wide model


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _one(name: str, factory: ModelFactory, windows: torch.Tensor) -> str:
    """The detail of a working method; raises PrunekitError when refused, returns 'broken: ...' when wrong."""
    import prunekit
    from prunekit.models.base import adapter_for
    from prunekit.structure.saving import save_structured
    from prunekit.structure.shrink_method import get_shrink_method

    method = get_shrink_method(name)
    ids = windows[:2]
    if name == "slicegpt":
        from prunekit.structure.methods.slicegpt import find_residual_layout, fold_norms, rotate_and_slice, untie_head

        model = factory().eval()
        before = _logits(model, ids)
        method.check(model)
        layout = find_residual_layout(model, adapter_for(model), windows[:1, :8])
        untie_head(model, layout)
        fold_norms(model, layout)
        rotate_and_slice(model, layout, windows, 2, layout.width)  # every axis kept: a rotation only
        rotated = _logits(model, ids)
        scale = float(before.abs().max())
        if not torch.allclose(rotated, before, rtol=1e-3, atol=1e-3 * max(scale, 1.0)):
            return f"broken: rotating without slicing changes the outputs by {float((rotated - before).abs().max()):.2e}"
    model = factory().eval()
    dense = _parameters(model)
    method.check(model)
    method.apply(model, windows, RATIO, 2)
    logits = _logits(model, ids)
    if not torch.isfinite(logits).all():
        return "broken: the shrunk model's outputs are not finite"
    removed = 1 - _parameters(model) / dense
    if removed < RATIO - SLACK:
        return f"broken: {removed:.1%} of the parameters removed, not {RATIO:.0%}"
    with tempfile.TemporaryDirectory() as tmp:
        save_structured(model, Path(tmp), adapter=adapter_for(model))
        loaded = prunekit.load(Path(tmp), kind="causal-lm").eval()
        if not torch.equal(_logits(loaded, ids), logits):
            return "broken: prunekit.load gives other outputs"
    return f"{name} {removed:.1%}"


def check(factory: ModelFactory, windows: torch.Tensor) -> SupportResult:
    details, refusals = [], []
    for name in ("svd-llm", "slicegpt"):
        try:
            outcome = _one(name, factory, windows)
        except PrunekitError as exc:
            refusals.append(f"{name}: {one_line(exc)}")
            continue
        if outcome.startswith("broken: "):
            return SupportResult("broken", f"{name}: {outcome.removeprefix('broken: ')}")
        details.append(outcome)
    if not details:
        return SupportResult("refused", "; ".join(refusals))
    return SupportResult("yes", ", ".join(details + [f"refused {refusal}" for refusal in refusals]))

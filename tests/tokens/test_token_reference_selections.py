"""Every method keeps the tokens it kept before the per-block overhead was cut (issue 17, item 5).

``data/reference_selections.json`` was written by the token code as it stood before that rewrite (run this file
as a module to rewrite it: ``python -m tests.tokens.test_token_reference_selections``). For each family and each
method it holds, on a fixed input, the original position every final token stands for, each token's size, the
tokens left after each reducing block, and four random projections of the model's output (a fingerprint of every
output value). The rewrite may change how fast a selection is made, never which tokens it makes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from prunekit.tokens import FAMILIES, METHODS, apply, find_family

from tests.tokens.conftest import hf_vit, prunekit_vit, tiny_bert, tiny_decoder

REFERENCE = Path(__file__).parent / "data" / "reference_selections.json"
RATIO = 0.3
PROJECTIONS = 4


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _text(batch: int, lengths: tuple[int, ...] | None = None, tokens: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 500, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row, length in enumerate(lengths or ()):
        mask[row, length:] = 0
    return ids * mask, mask


def _vision(model_factory: Callable[[], torch.nn.Module], batch: int):
    model = model_factory()
    images = _images(batch)

    def run() -> torch.Tensor:
        output = model(images)
        return output.logits if hasattr(output, "logits") else output

    return model, run


def _encoder(batch: int, lengths: tuple[int, ...] | None):
    model = tiny_bert()
    ids, mask = _text(batch, lengths)
    return model, lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state


def _decoder(batch: int):
    model = tiny_decoder()
    ids, _mask = _text(batch, tokens=12)
    return model, lambda: model(input_ids=ids).logits


# name: (family, how to build the model and its forward pass); batch 1 and unpadded batches take the rectangular
# shortcuts, padded text the general path.
CASES: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, Callable[[], torch.Tensor]]]]] = {
    "prunekit-vit b1": ("prunekit-vit", lambda: _vision(prunekit_vit, 1)),
    "prunekit-vit b5": ("prunekit-vit", lambda: _vision(prunekit_vit, 5)),
    "hf-vit b3": ("encoder", lambda: _vision(hf_vit, 3)),
    "bert b1": ("encoder", lambda: _encoder(1, None)),
    "bert padded b3": ("encoder", lambda: _encoder(3, (20, 13, 7))),
    "llama b1": ("causal-lm", lambda: _decoder(1)),
    "llama b3": ("causal-lm", lambda: _decoder(3)),
}


def _methods(family: str) -> list[str]:
    runs = FAMILIES.get(family).can_run
    return [name for name in METHODS.names() if runs(METHODS.get(name))]


def _fingerprint(output: torch.Tensor) -> list[float]:
    flat = output.detach().double().flatten()
    directions = torch.randn(PROJECTIONS, flat.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (directions @ flat).tolist()


def observe(case: str) -> dict[str, Any]:
    """What every method does to the case's input: kept positions, sizes, the trace and the output's fingerprint."""
    family, build = CASES[case]
    model, run = build()
    found: dict[str, Any] = {}
    with torch.no_grad():
        for method in _methods(family):
            with apply(model, method, RATIO) as patch:
                output = run()
                found[method] = {
                    "kept": patch.kept_positions().tolist(),
                    "sizes": patch.state.sizes.tolist(),
                    "steps": [[step.layer, step.tokens_before, step.tokens_after] for step in patch.trace.steps],
                    "output_shape": list(output.shape),
                    "fingerprint": _fingerprint(output),
                }
    return found


def _reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_keeps_the_reference_tokens(case):
    expected = _reference()["cases"][case]
    found = observe(case)
    assert sorted(found) == sorted(expected)
    for method, seen in found.items():
        reference = expected[method]
        assert seen["kept"] == reference["kept"], method
        assert seen["sizes"] == reference["sizes"], method
        assert seen["steps"] == reference["steps"], method
        assert seen["output_shape"] == reference["output_shape"], method
        for got, want in zip(seen["fingerprint"], reference["fingerprint"]):
            # the reference was written on another run, maybe another machine: allow last-bit BLAS differences
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), (method, got, want)


def test_the_reference_covers_every_method_of_every_family():
    cases = _reference()["cases"]
    for case, (family, _build) in CASES.items():
        assert sorted(cases[case]) == sorted(_methods(family)), case
    assert find_family(prunekit_vit()).name == "prunekit-vit"


def write_reference() -> None:
    torch.set_num_threads(1)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    data = {"ratio": RATIO, "written_by": "the token code before the per-block overhead rewrite (issue 17, item 5)",
            "cases": {case: observe(case) for case in CASES}}
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    write_reference()

"""Structural pruning on every architecture of the coverage list, as ``prunekit shrink`` runs it.

Each case shrinks a tiny random model by 20 % of its parameters with the job's defaults and verifies what a
shrunk model promises (``prunekit.tools.support.structure.check``): a finite forward, the planned parameter
count, the original's outputs with the removed units zeroed, and identical outputs after save → load. A
case passes when that holds or when prunekit refuses in one line; a crash or a wrong model fails it.
"""

from __future__ import annotations

import pytest
import torch

from prunekit.tools.support import checked_once
from prunekit.tools.support.structure import check, check_classifier
from prunekit.tools.support.tiny import CLASSIFIERS, DECODERS, ENCODERS, VOCAB, classifier_batch, tiny_classifier

WINDOWS = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
_result = checked_once(check, WINDOWS)


@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_shrink_works_or_refuses_in_one_line(model_type):
    result = _result(model_type)
    assert result.ok, f"{model_type}: {result.cell()}"
    assert result.detail and "\n" not in result.detail


def test_at_least_twenty_decoders_shrink_and_every_encoder():
    decoders = [model_type for model_type in DECODERS if _result(model_type).status == "yes"]
    assert len(decoders) >= 20, f"only {len(decoders)} decoders shrink: {decoders}"
    refused = {model_type: _result(model_type).detail for model_type in ENCODERS if _result(model_type).status != "yes"}
    assert not refused, refused


@pytest.mark.parametrize("shape", CLASSIFIERS)
def test_every_cnn_shape_shrinks_exactly(shape):
    images, labels = classifier_batch()
    result = check_classifier(lambda: tiny_classifier(shape), images, labels)
    assert result.status == "yes", f"{shape}: {result.cell()}"

"""Token reduction on every decoder and encoder architecture the coverage test builds: it works and is right,
or it is refused in one line, never broken (see ``prunekit.tools.support.tokens``)."""

import pytest
import torch

from prunekit.tools.support.tokens import NEW_TOKENS, PROMPT, check
from tests.models.tiny_models import DECODERS, ENCODERS, tiny_causal_lm, tiny_encoder


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 250, (2, PROMPT + NEW_TOKENS), generator=torch.Generator().manual_seed(0))  # tiny vocabulary: 256


@pytest.mark.parametrize("model_type", DECODERS)
def test_token_reduction_on_a_decoder_works_or_is_refused(model_type, windows):
    result = check(lambda: tiny_causal_lm(model_type), windows)
    assert result.ok, result.cell()


@pytest.mark.parametrize("model_type", ENCODERS)
def test_token_reduction_on_an_encoder_works_or_is_refused(model_type, windows):
    result = check(lambda: tiny_encoder(model_type), windows)
    assert result.ok, result.cell()

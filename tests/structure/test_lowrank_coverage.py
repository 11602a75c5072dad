"""SVD-LLM and SliceGPT on every decoder of the coverage list (``prunekit.tools.support.lowrank.check``): the
parameters removed, finite outputs, identical outputs after save → ``prunekit.load``, SliceGPT's rotation without
slicing leaving the outputs unchanged; or a one-line refusal naming what the method cannot rewrite."""

from __future__ import annotations

import pytest
import torch

from prunekit.tools.support import checked_once
from prunekit.tools.support.lowrank import check
from prunekit.tools.support.tiny import DECODERS, VOCAB

WINDOWS = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
_result = checked_once(check, WINDOWS)


@pytest.mark.parametrize("model_type", DECODERS)
def test_svd_llm_and_slicegpt_work_or_refuse_in_one_line(model_type):
    result = _result(model_type)
    assert result.ok, f"{model_type}: {result.cell()}"
    assert result.detail and "\n" not in result.detail


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3", "helium"])
def test_slicegpt_slices_and_reloads_every_llama_style_decoder(model_type):
    # qwen2, phi3, granite and smollm3 derive the head size from the hidden size: the saved config must say it
    result = _result(model_type)
    assert result.status == "yes" and "slicegpt" in result.detail and "refused slicegpt" not in result.detail, \
        result.cell()

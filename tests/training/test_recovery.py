"""Recovery fine-tuning keeps the mask: full training and masked LoRA never revive a pruned weight."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.training.lora import MaskedLoRA, attach_masked_lora, merge_lora
from prunekit.training.recovery import pruned_layers, recover, zero_masks
from prunekit.weights import prune_weights
from tests.conftest import tiny_llama


def test_masked_lora_forward_equals_its_merge_and_keeps_zeros():
    layer = torch.nn.Linear(12, 8)
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    zeros = layer.weight == 0
    params = attach_masked_lora(torch.nn.Sequential(layer), {"0": layer}, rank=4, alpha=8)
    assert len(params) == 2 and not layer.parametrizations.weight.original.requires_grad
    with torch.no_grad():
        params[1].normal_()  # B ≠ 0: the update is live
    lora = layer.parametrizations.weight[0]
    assert isinstance(lora, MaskedLoRA)
    x = torch.randn(5, 12)
    expected_weight = torch.where(~zeros, layer.parametrizations.weight.original + lora.scaling * params[1] @ params[0], 0)
    assert torch.allclose(layer.weight, expected_weight)
    before = layer(x)
    assert merge_lora(torch.nn.Sequential(layer)) == 1
    assert torch.equal(layer(x), before)  # the merged model is the trained function
    assert torch.equal(layer.weight == 0, zeros | (layer.weight == 0)) and torch.all(layer.weight[zeros] == 0)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_on_a_tiny_model_never_revives_and_learns(mode):
    model = tiny_llama(vocab=512)
    prune_weights(model, "magnitude", 0.5)
    before = zero_masks(pruned_layers(model))
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))  # a learnable, small vocabulary
    result = recover(model, windows, update=mode, keep_zeros=True, steps=12, batch_size=4, lr=3e-3, warmup_steps=1)
    after = zero_masks(pruned_layers(model))
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert all(p.requires_grad for p in model.parameters())


def test_recovery_refuses_a_dense_model_and_bad_settings():
    with pytest.raises(PrunekitError, match="no pruned weights"):
        recover(tiny_llama(vocab=512), torch.zeros(2, 8, dtype=torch.long), keep_zeros=True, steps=1)
    model = tiny_llama(vocab=512)
    prune_weights(model, "magnitude", 0.5)
    with pytest.raises(PrunekitError, match="unknown recovery update 'qlora'; choose full or lora"):
        recover(model, torch.zeros(2, 8, dtype=torch.long), update="qlora", steps=1)
    with pytest.raises(PrunekitError, match="steps must be a positive"):
        recover(model, torch.zeros(2, 8, dtype=torch.long), steps=0)


@pytest.mark.slow
def test_smollm2_recovery_keeps_every_zero_and_lowers_the_loss(smollm2):
    """The real model: magnitude 50 %, then a few steps of each mode on real calibration text."""
    from prunekit.core.text import TextProtocol, calibration_windows

    model = smollm2.model
    prune_weights(model, "magnitude", 0.5)
    layers = pruned_layers(model)
    assert len(layers) == 30 * 7
    before = zero_masks(layers)
    windows = calibration_windows(smollm2.tokenizer, TextProtocol(calibration_samples=4, seq_len=48, seed=1))
    evaluate = windows[:2]

    def loss():
        with torch.no_grad():
            return float(model(input_ids=evaluate, labels=evaluate).loss)

    start = loss()
    recover(model, windows, update="lora", steps=3, batch_size=2, lr=1e-3)
    after_lora = loss()
    recover(model, windows, keep_zeros=True, train_embeddings=True, steps=3, batch_size=2, lr=5e-5)
    after_full = loss()
    after = zero_masks(pruned_layers(model))
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert after_full < after_lora < start

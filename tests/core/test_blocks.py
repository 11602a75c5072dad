"""Feeding a model's blocks one at a time: what each block is given, and what refuses to be fed that way."""

import pytest
import torch
from torch import nn

from prunekit.core.calibration import SequentialCalibration, Target, run_sequential
from prunekit.core.statistics import InputNorms
from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from tests.models.tiny_models import tiny_causal_lm


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "cohere", "lfm2", "jamba", "qwen3_moe",
                                        "gpt2", "opt", "falcon_h1"])
def test_block_by_block_logits_equal_the_models_own(model_type):
    """Sliding-window and full-attention layers get their own masks, hybrids their own inputs, and the model's
    code after the blocks (norm, head, soft-capping, logit scale) runs as it is."""
    model = tiny_causal_lm(model_type)
    windows = torch.randint(3, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    adapter = adapter_for(model)
    steps = SequentialCalibration(adapter, processor=None, mode="dense")
    with torch.no_grad():
        steps.capture(model, windows, batch_size=2)
        for index, block in enumerate(adapter.blocks()):
            steps.run_block(index, block, [])
        expected = [model(input_ids=windows[i:i + 2], use_cache=False).logits for i in (0, 2)]
    for got, want in zip(steps.logits(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layers_of_different_kinds_are_given_their_own_arguments():
    model = tiny_causal_lm("gemma2", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    adapter = adapter_for(model)
    steps = SequentialCalibration(adapter, processor=None, mode="dense")
    steps.capture(model, torch.randint(3, 250, (1, 16)), batch_size=1)
    first, second = steps.inputs.calls[0]
    assert first.kwargs["attention_mask"] is not second.kwargs["attention_mask"]


class _Recorder:
    def __init__(self):
        self.seen = {}

    def statistics(self, target):
        return InputNorms

    def process(self, target, stats):
        self.seen[target.name] = stats


def test_each_expert_sees_exactly_the_tokens_routed_to_it():
    model = tiny_causal_lm("qwen3_moe")
    adapter = adapter_for(model)
    windows = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))
    experts = model.model.layers[0].mlp.experts
    routed: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: routed.append((args[0].detach(), args[1].detach())))
    with torch.no_grad():
        for start in (0, 2):
            model(input_ids=windows[start:start + 2], use_cache=False)
    handle.remove()
    targets = [t for t in adapter.block_weights(0) if t.expert is not None]
    recorder = _Recorder()
    run_sequential(model, adapter, windows, targets, recorder, mode="layer", batch_size=2)
    for expert in range(experts.gate_up_proj.shape[0]):
        rows = torch.cat([hidden[(index == expert).any(-1)] for hidden, index in routed])
        stats = recorder.seen[f"model.layers.0.mlp.experts.gate_up_proj.{expert}"]
        assert stats.rows == rows.shape[0]
        torch.testing.assert_close(stats.squared_sum, rows.double().square().sum(0), rtol=1e-5, atol=1e-6)


def test_an_expert_no_token_reaches_is_handed_to_unreached():
    model = tiny_causal_lm("qwen3_moe")
    adapter = adapter_for(model)
    experts = model.model.layers[0].mlp.experts

    def never_expert_3(_module, args):  # the router's choices, with expert 3 replaced by expert 0
        hidden, index, weights = args
        return hidden, torch.where(index == 3, torch.zeros_like(index), index), weights

    experts.register_forward_pre_hook(never_expert_3)
    targets = [t for t in adapter.block_weights(0) if t.expert is not None]

    class Pruning(_Recorder):
        unreached_names: list = []

        def unreached(self, target):
            self.unreached_names.append(target.name)

    recorder = Pruning()
    run_sequential(model, adapter, torch.randint(3, 250, (2, 16)), targets, recorder, batch_size=2)
    assert sorted(recorder.unreached_names) == ["model.layers.0.mlp.experts.down_proj.3",
                                                "model.layers.0.mlp.experts.gate_up_proj.3"]
    assert "model.layers.0.mlp.experts.gate_up_proj.3" not in recorder.seen


class _Block(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.functional = functional

    def forward(self, hidden):
        if self.functional:  # the weight multiplied directly, as Jamba's dt_proj is
            return hidden + (self.proj.weight @ hidden.mT).mT
        return hidden + self.proj(hidden)


class _Toy(nn.Module):
    def __init__(self, order=(0, 1), between=None, functional=False):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.layers = nn.ModuleList([_Block(functional), _Block(functional)])
        self.order, self.between = order, between

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for index in self.order:
            hidden = self.layers[index](hidden)
            if self.between is not None:
                hidden = self.between(hidden)
        return hidden


def test_blocks_that_run_out_of_order_are_refused():
    model = _Toy(order=(1, 0))
    with pytest.raises(PrunekitError, match="does not run its 2 blocks once each in order"):
        SequentialCalibration(adapter_for(model), None, "dense").capture(model, torch.randint(0, 50, (2, 6)), 2)


def test_hidden_states_changed_between_blocks_are_refused():
    model = _Toy(between=lambda hidden: hidden * 2)
    with pytest.raises(PrunekitError, match="changes the hidden states between blocks"):
        SequentialCalibration(adapter_for(model), None, "dense").capture(model, torch.randint(0, 50, (2, 6)), 2)


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_a_weight_used_without_its_module_is_calibrated_where_it_is_used(mode):
    model = _Toy(functional=True)
    windows = torch.randint(0, 50, (2, 6))
    block = model.layers[0]
    target = Target("layers.0.proj", block.proj, 0)
    recorder = _Recorder()
    run_sequential(model, adapter_for(model), windows, [target], recorder, mode=mode, batch_size=1)
    with torch.no_grad():
        inputs = model.embed(windows).reshape(-1, 8)
    stats = recorder.seen["layers.0.proj"]
    assert stats.rows == inputs.shape[0]
    torch.testing.assert_close(stats.squared_sum, inputs.double().square().sum(0), rtol=1e-5, atol=1e-6)


def test_a_layer_the_data_never_reaches_is_named():
    model = _Toy()
    unused = nn.Linear(8, 8)
    model.layers[0].unused = unused
    target = Target("layers.0.unused", unused, 0)
    with pytest.raises(PrunekitError, match="never reached layers.0.unused in block 0; leave it out with --exclude"):
        run_sequential(model, adapter_for(model), torch.randint(0, 50, (2, 6)), [target], _Recorder(), batch_size=1)

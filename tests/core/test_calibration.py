"""The sequential engine against naive reference implementations of its two orders."""

import copy

import pytest
import torch

from prunekit.core.calibration import HEAD, SequentialCalibration, Target, run_sequential
from prunekit.core.patterns import SparsityPattern
from prunekit.core.statistics import InputHessian, InputNorms, TwinInputHessian
from prunekit.errors import PrunekitError
from prunekit.models import adapter_for
from prunekit.weights import get_method
from prunekit.weights.pipeline import select_targets
from tests.conftest import tiny_llama


class Recorder:
    """Prunes with a method and records the statistics each layer saw."""

    def __init__(self, method, sparsity=0.5):
        self.method, self.sparsity, self.seen = method, sparsity, {}

    def statistics(self, target):
        return self.method.statistics

    def process(self, target, stats):
        self.seen[target.name] = stats
        self.method.prune(target.module.weight.data, stats, self.sparsity, SparsityPattern())


def _inputs_of(model, module, windows, batch_size):
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size], use_cache=False)
    handle.remove()
    return captured


def _reference(model, method, windows, batch_size, order):
    """Naive: recompute every needed input with a full forward pass of the partly pruned model."""
    targets = select_targets(model, adapter_for(model))
    if order == "layer":
        groups = [[t] for t in targets]
    else:
        groups = [[t for t in targets if t.block == b] for b in sorted({t.block for t in targets})]
    for group in groups:
        stats = {}
        for target in group:
            stats[target.name] = method.statistics(target.module.weight.shape[1])
            for x in _inputs_of(model, target.module, windows, batch_size):
                stats[target.name].add(x)
        for target in group:
            method.prune(target.module.weight.data, stats[target.name], 0.5, SparsityPattern())


@pytest.mark.parametrize("order", ["layer", "block"])
@pytest.mark.parametrize("method_name", ["wanda", "sparsegpt"])
def test_engine_matches_naive_reference(order, method_name):
    model = tiny_llama(layers=3, vocab=512)
    reference = copy.deepcopy(model)
    windows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    method = get_method(method_name)
    targets = select_targets(model, adapter_for(model))
    run_sequential(model, adapter_for(model), windows, targets, Recorder(method), mode=order, batch_size=2)
    _reference(reference, method, windows, 2, order)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a == 0, b == 0), f"masks differ at {name}"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layer_order_differs_from_block_order():
    """The two orders are really different: later layers see pruned earlier layers only in 'layer'."""
    model = tiny_llama(layers=1, vocab=512)
    other = copy.deepcopy(model)
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    method = get_method("wanda")
    for m, order in ((model, "layer"), (other, "block")):
        run_sequential(m, adapter_for(m), windows, select_targets(m, adapter_for(m)), Recorder(method), mode=order)
    q_same = torch.equal(model.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight)
    down_same = torch.equal(model.model.layers[0].mlp.down_proj.weight, other.model.layers[0].mlp.down_proj.weight)
    assert q_same and not down_same


def test_shared_inputs_share_statistics_and_dense_mode_changes_nothing():
    model = tiny_llama(layers=2, vocab=512)
    before = copy.deepcopy(model.state_dict())
    windows = torch.randint(0, 512, (4, 16))

    class Collect:
        seen = {}

        def statistics(self, target):
            return InputHessian

        def process(self, target, stats):
            self.seen[target.name] = stats

    collect = Collect()
    run_sequential(model, adapter_for(model), windows, select_targets(model, adapter_for(model)), collect, mode="dense")
    seen = collect.seen
    attn = "model.layers.1.self_attn."
    assert seen[attn + "q_proj"] is seen[attn + "k_proj"] is seen[attn + "v_proj"]
    assert seen[attn + "o_proj"] is not seen[attn + "q_proj"]
    assert seen["model.layers.0.mlp.gate_proj"] is seen["model.layers.0.mlp.up_proj"]
    assert seen[attn + "q_proj"].rows == 4 * 16
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_head_target_sees_final_norm_output():
    model = tiny_llama(layers=1, vocab=512, tie=False)
    windows = torch.randint(0, 512, (2, 8))
    head = Target("lm_head", model.lm_head, HEAD)

    class Collect:
        def statistics(self, target):
            return InputNorms

        def process(self, target, stats):
            self.stats = stats

    collect = Collect()
    run_sequential(model, adapter_for(model), windows, [head], collect)
    (x,) = _inputs_of(model, model.lm_head, windows, 4)
    torch.testing.assert_close(collect.stats.norms(), x.reshape(-1, x.shape[-1]).norm(dim=0))


def test_nan_activations_are_reported():
    from prunekit.errors import PrunekitError

    model = tiny_llama(layers=2, vocab=512)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    targets = [t for t in select_targets(model, adapter_for(model)) if t.block == 1]
    with pytest.raises(PrunekitError, match="NaN or inf after block 0"):
        run_sequential(model, adapter_for(model), torch.randint(0, 512, (2, 8)), targets,
                       Recorder(get_method("wanda")))


class TwinRecorder:
    """Zeroes the smaller half of every weight (by magnitude) and keeps the paired statistics each layer saw."""

    def __init__(self, prune=True):
        self.prune, self.seen = prune, {}

    def statistics(self, target):
        return TwinInputHessian

    def process(self, target, stats):
        self.seen[target.name] = stats
        if self.prune:
            get_method("magnitude").prune(target.module.weight.data, None, 0.5, SparsityPattern())


def test_the_twin_stream_pairs_each_layer_with_the_dense_models_inputs():
    model = tiny_llama(layers=2, vocab=512, tie=False)
    dense = copy.deepcopy(model)
    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    targets = select_targets(model, adapter_for(model), include=["model.layers.*", "lm_head"])
    recorder = TwinRecorder()
    run_sequential(model, adapter_for(model), windows, targets, recorder, batch_size=2, twin=True)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                 "lm_head"):
        # every layer before it in the forward pass is pruned, the layer itself not yet: its input is the one the
        # final model gives it; the dense input is the unpruned model's
        x = torch.cat(_inputs_of(model, model.get_submodule(name), windows, 2)).reshape(-1, 64 if "down" not in name
                                                                                         else 128)
        d = torch.cat(_inputs_of(dense, dense.get_submodule(name), windows, 2)).reshape(x.shape)
        stats, gram, shift = recorder.seen[name], x.T @ x, (d - x).T @ x
        assert (d - x).abs().max() > 1e-2 * x.abs().max()  # the streams really parted
        torch.testing.assert_close(stats.gram_matrix(), gram, rtol=1e-4, atol=1e-5 * float(gram.abs().max()))
        torch.testing.assert_close(stats.shift, shift, rtol=1e-4, atol=1e-4 * float(shift.abs().max()))
    assert not recorder.seen["model.layers.0.self_attn.q_proj"].shift.any()  # the first layer: one stream


def test_a_twin_stream_over_an_unchanged_model_never_parts():
    model = tiny_llama(layers=2, vocab=512)
    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(4))
    recorder = TwinRecorder(prune=False)
    steps = SequentialCalibration(adapter_for(model), recorder, twin=True)
    steps.capture(model, windows, 2)
    blocks = adapter_for(model).blocks()
    steps.run_block(0, blocks[0], [])  # nothing to process: the one block runs both streams
    steps.run_block(1, blocks[1], select_targets(model, adapter_for(model), include=["model.layers.1.*"]))
    assert all(torch.equal(a, b) for a, b in zip(steps.inputs.hidden, steps.inputs.reference_hidden))
    assert len(recorder.seen) == 7 and not any(stats.shift.any() for stats in recorder.seen.values())


def test_the_twin_stream_needs_layer_order():
    model = tiny_llama(layers=1, vocab=512)
    with pytest.raises(PrunekitError, match="layer by layer"):
        SequentialCalibration(adapter_for(model), TwinRecorder(), "block", twin=True)

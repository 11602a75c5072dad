"""SliceGPT: folding and rotating leave the function unchanged, slicing keeps the planned parameters and computes
the projected stream exactly (shortcuts included), saved models reload identically, other architectures are
refused in one line."""

import copy
import json

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.core.shortcuts import ResidualShortcut, attach_shortcut, input_maps, residual_shortcuts
from prunekit.errors import PrunekitError
from prunekit.models.base import adapter_for
from prunekit.structure.methods.slicegpt import (find_residual_layout, fold_norms, plan_widths, principal_axes,
                                                 rotate_and_slice, untie_head)
from prunekit.structure.saving import save_structured
from prunekit.structure.shrink_method import get_shrink_method
from tests.conftest import TINY_VOCAB as VOCAB
from tests.conftest import tiny_inputs, tiny_llama

SMALL = ["--calib-samples", "4", "--test-windows", "2", "--seq-len", "64", "--runs", "1", "--no-peak-memory"]


def _random_norms(model):
    """Random norm scales (transformers initialises them to 1, which would make folding trivially exact)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


def _tiny(family: str = "llama", tie: bool = True, vocab: int = VOCAB):
    """A tiny random decoder of a Llama-style family, with random norm scales."""
    import transformers

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tie)
    torch.manual_seed(0)
    if family == "llama":
        return _random_norms(tiny_llama(vocab=vocab, tie=tie))
    config_class, model_class = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM"),
                                 "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                                 "gemma": ("GemmaConfig", "GemmaForCausalLM"),
                                 "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
                                 "phi": ("PhiConfig", "PhiForCausalLM"),
                                 "gpt2": ("GPT2Config", "GPT2LMHeadModel")}[family]
    if family == "gpt2":
        common = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=256)
    if family == "phi3":
        common["pad_token_id"] = 0
    config = getattr(transformers, config_class)(**common)
    return _random_norms(getattr(transformers, model_class)(config).eval())


def _logits(model):
    with torch.no_grad():
        return model(tiny_inputs()).logits


def _layout(model, calibration):
    return find_residual_layout(model, adapter_for(model), calibration[:1, :8])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_folding_then_rotating_without_slicing_leaves_the_output_unchanged(family, calibration):
    model = _tiny(family)
    reference = _logits(model)
    layout = _layout(model, calibration)
    untie_head(model, layout)
    fold_norms(model, layout)
    assert all(bool((model.get_submodule(path).weight == 1).all()) for path in layout.norms())
    assert torch.allclose(_logits(model), reference, atol=1e-5), "folding changed the output"
    rotate_and_slice(model, layout, calibration, 4, layout.width)
    shortcuts = residual_shortcuts(model)
    assert len(shortcuts) == 2 * len(layout.blocks)
    # The shortcuts are real rotations (Q_inᵀ Q_mid ≠ I): the test would fail if they were misplaced.
    assert all(not torch.allclose(s.weight, torch.eye(layout.width), atol=1e-2) for s in shortcuts.values())
    assert torch.allclose(_logits(model), reference, atol=1e-4), "rotation changed the output"


def test_a_head_kept_tied_gets_an_input_map_and_the_output_is_unchanged_without_slicing(calibration):
    model = _tiny()
    reference = _logits(model)
    layout = _layout(model, calibration)
    final_scale = fold_norms(model, layout)
    assert final_scale is not None and torch.allclose(_logits(model), reference, atol=1e-5)
    rotate_and_slice(model, layout, calibration, 4, layout.width, final_scale)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(input_maps(model)) == {"tied_head_map"}
    assert torch.allclose(_logits(model), reference, atol=1e-4)


@pytest.mark.parametrize("head", ["untie", "tied"])
def test_a_tied_head_is_untied_or_kept_as_asked_and_reloads_identically(head, calibration, tmp_path):
    model = _tiny()
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = get_shrink_method({"name": "slicegpt", "head": head}).apply(model, calibration, 0.3, 4)
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert after == result["parameters_planned"] and abs(1 - after / before - 0.3) < 0.1  # steps of 8 of 64
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (head == "tied")
    assert len(input_maps(model)) == (head == "tied")
    assert ("untied" in result["summary"]) == (head == "untie")
    save_structured(model, tmp_path, adapter=adapter_for(model))
    loaded = prunekit.load(tmp_path, kind="causal-lm")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (head == "tied")
    assert torch.equal(_logits(loaded), _logits(model))


def test_untying_keeps_the_embeddings_and_says_so_in_the_config(calibration):
    model = _tiny()
    layout = _layout(model, calibration)
    assert layout.tied
    untie_head(model, layout)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False and not layout.tied


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_slicing_reaches_the_planned_parameter_count(ratio, calibration):
    model = _tiny()
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = get_shrink_method("slicegpt").apply(model, calibration, ratio, 4)
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert after == result["parameters_planned"]
    kept = result["hidden_after"]
    assert kept % 8 == 0 and kept < 64
    # The closest multiple of 8 to the ratio: one step of 8 either way is no closer.
    plan = plan_widths(_tiny(), _layout(_tiny(), calibration))
    error = abs(1 - after / before - ratio)
    for other in (kept - 8, kept + 8):
        if 8 <= other <= 64:
            assert error <= abs(1 - plan.parameters_at(other) / before - ratio)
    assert model.model.embed_tokens.weight.shape == (VOCAB, kept) and model.lm_head.weight.shape == (VOCAB, kept)
    assert "untied" in result["summary"]


def _projected_reference(model, layout, result):
    """The folded full-width model with the stream projected onto the kept axes wherever the sliced model drops
    the others: what the sliced model must compute (shortcuts included), written independently of the slicer."""
    kept = result.kept

    def projector(basis):
        return basis[:, :kept] @ basis[:, :kept].T

    handles, remembered = [], {}
    block_modules = adapter_for(model).blocks()
    for block, bases in zip(layout.blocks, result.bases):
        if block.index == 0:
            def project_input(_m, args, kwargs, p=projector(result.embedding_basis)):
                if args:
                    return ((args[0].double() @ p).float(), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": (kwargs["hidden_states"].double() @ p).float()}

            handles.append(block_modules[0].register_forward_pre_hook(project_input, with_kwargs=True))
        for norm, branch, basis in ((block.attention_norm, block.attention, bases.middle),
                                    (block.mlp_norm, block.mlp, bases.outward)):
            def remember(_m, args, key=norm):
                remembered[key] = args[0]

            def project(_m, _args, output, key=norm, p=projector(basis)):
                x = remembered[key]
                a = output[0] if isinstance(output, tuple) else output
                new = ((x.double() + a.double()) @ p - x.double()).float()
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(model.get_submodule(norm).register_forward_pre_hook(remember))
            handles.append(model.get_submodule(branch).register_forward_hook(project))
    try:
        return _logits(model)
    finally:
        for handle in handles:
            handle.remove()


def test_the_sliced_model_computes_the_projected_stream_through_its_shortcuts(calibration):
    model = _tiny()
    layout = _layout(model, calibration)
    untie_head(model, layout)
    fold_norms(model, layout)
    folded = copy.deepcopy(model)
    result = rotate_and_slice(model, layout, calibration, 4, 40)
    sliced = _logits(model)
    expected = _projected_reference(folded, _layout(folded, calibration), result)
    assert torch.allclose(sliced, expected, atol=2e-5), float((sliced - expected).abs().max())
    assert model.model.norm.variance_epsilon == pytest.approx(folded.model.norm.variance_epsilon * 64 / 40)
    assert not torch.allclose(sliced, _logits(folded), atol=1e-2)  # slicing did change something
    # Without its shortcuts (plain identity residuals) the sliced model computes something else.
    for shortcut in residual_shortcuts(model).values():
        with torch.no_grad():
            shortcut.weight.copy_(torch.eye(shortcut.width))
    assert not torch.allclose(_logits(model), expected, atol=1e-2)


def test_a_shortcut_maps_the_residual_and_leaves_the_branch():
    """``x + branch(norm(x))`` becomes ``x S + branch(norm(x))``."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(6)
            self.branch = torch.nn.Linear(6, 6)

        def forward(self, x):
            return x + self.branch(self.norm(x))

    block = Block()
    x = torch.randn(3, 6)
    with torch.no_grad():
        plain = block.branch(block.norm(x))
    matrix = torch.randn(6, 6)
    attach_shortcut(block, "shortcut", "norm", "branch", matrix)
    assert isinstance(block.shortcut, ResidualShortcut)
    with torch.no_grad():
        assert torch.allclose(block(x), x @ matrix + plain, atol=1e-5)


def test_the_rotation_is_deterministic(calibration):
    first, second = _tiny(), _tiny()
    for model in (first, second):
        get_shrink_method({"name": "slicegpt", "unit": 16}).apply(model, calibration, 0.25, 4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    moment = torch.randn(5, 5, dtype=torch.float64)
    axes = principal_axes(moment @ moment.T)
    assert torch.allclose(axes.T @ axes, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert bool((axes[axes.abs().argmax(0), torch.arange(5)] > 0).all())  # the sign is fixed


@pytest.mark.parametrize("heads", [4, 9])
def test_saved_and_reloaded_it_gives_identical_outputs(heads, calibration, tmp_path):
    """With 9 heads (SmolLM2's count) the kept width is no multiple of the heads, which Llama's config refuses as
    a hidden size: the config keeps the original one and the shape spec describes the sliced widths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = _random_norms(LlamaForCausalLM(LlamaConfig(
        hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads={4: 2, 9: 3}[heads], head_dim=72 // heads, vocab_size=VOCAB,
        tie_word_embeddings=True)).eval())
    get_shrink_method("slicegpt").apply(model, calibration, 0.25, 4)
    saved = save_structured(model, tmp_path, adapter=adapter_for(model))
    assert not saved.from_pretrained and not saved.remote_code
    assert any("refuses the new hidden_size" in reason for reason in saved.reasons) == (heads == 9)
    loaded = prunekit.load(tmp_path, kind="causal-lm")
    assert set(residual_shortcuts(loaded)) == set(residual_shortcuts(model))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(model))
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):  # plain from_pretrained finds no weights it knows: it refuses, never guesses
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("family, why", [("gemma", "scales by 1 \\+ weight"),
                                         ("stablelm", "LayerNorm with a bias"),
                                         ("phi", "1 norms .* not the two of a pre-norm block"),
                                         ("gpt2", "c_attn is a Conv1D")])
def test_architectures_it_cannot_rotate_are_refused_in_one_line(family, why, calibration):
    model = _tiny(family)
    with pytest.raises(PrunekitError, match=why) as caught:
        get_shrink_method("slicegpt").apply(model, calibration, 0.25, 4)
    assert "\n" not in str(caught.value)


def test_a_sliced_model_is_not_sliced_again(calibration):
    model = _tiny()
    get_shrink_method("slicegpt").apply(model, calibration, 0.25, 4)
    with pytest.raises(PrunekitError, match="already sliced"):
        get_shrink_method("slicegpt").apply(model, calibration, 0.25, 4)


def test_cli_shrinks_with_slicegpt_and_refuses_an_architecture_in_one_line(tiny_model_dir, tokenizer, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    assert main(["shrink", str(tiny_model_dir), "--method", "slicegpt", "--ratio", "0.25", *SMALL,
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == {"name": "slicegpt", "unit": 8, "head": "untie"}
    assert report["method"]["hidden_after"] < report["method"]["hidden_before"] == 64
    assert report["parameters"]["after"] == report["method"]["parameters_planned"]
    assert abs(report["parameters"]["removed_fraction"] - 0.25) < 0.05
    assert "slicegpt" in (out / "report.md").read_text() and "untied" in (out / "report.md").read_text()
    loaded = prunekit.load(out, kind="causal-lm")
    assert len(residual_shortcuts(loaded)) == 4
    gemma = tmp_path / "gemma"
    _tiny("gemma", vocab=tokenizer.vocab_size).save_pretrained(gemma)
    tokenizer.save_pretrained(gemma)
    capsys.readouterr()
    assert main(["shrink", str(gemma), "--method", "slicegpt", "--ratio", "0.25", *SMALL,
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: slicegpt cannot rotate GemmaForCausalLM")
    assert not (tmp_path / "refused").exists()


def test_width_keeping_maps_must_be_square():
    from torch import nn

    from prunekit.core.shortcuts import attach_input_map

    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    with pytest.raises(PrunekitError, match="input map keeps the width; \\(4, 3\\) is not square"):
        attach_input_map(model, "map", "1", torch.zeros(4, 3))
    with pytest.raises(PrunekitError, match="shortcut maps the stream onto itself; \\(3, 4\\) is not square"):
        attach_shortcut(model, "shortcut", "0", "1", torch.zeros(3, 4))
    mapping = attach_input_map(model, "map", "1", 2 * torch.eye(4))
    x = torch.randn(2, 4)
    assert torch.allclose(model[1](x), nn.functional.linear(2 * x, model[1].weight, model[1].bias))
    assert mapping.weight.shape == (4, 4)

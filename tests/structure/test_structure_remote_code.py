"""Shrunk models whose widths differ by layer load with plain transformers (``trust_remote_code=True``) in a
Python where prunekit cannot be imported, and give the in-memory model's outputs exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.io.remote_code import MODELING_FILE
from prunekit.models import adapter_for
from prunekit.structure import lm_example_inputs, prune_structure
from prunekit.structure.graph import build_graph
from prunekit.structure.saving import save_structured
from prunekit.structure.shrink import shrink
from prunekit.tools.support.tiny import ENCODERS, VOCAB, tiny_causal_lm, tiny_encoder

TOKENS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
PROMPT = TOKENS[:1, :5]
# Separate and fused projections, grouped-query and derived head sizes, GPT-2's Conv1D, sliding windows, an encoder.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "opt", "falcon", "gpt_neox", "bert")

# Runs in a fresh interpreter (-I) in which importing prunekit fails, whatever the way it is installed.
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoPrunekit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "prunekit":
                raise ImportError("prunekit is not installed here")

    sys.meta_path.insert(0, NoPrunekit())
    try:
        import prunekit
    except ImportError:
        pass
    else:
        raise SystemExit("prunekit could be imported")
    import torch
    import transformers

    jobs = json.loads(sys.argv[1])
    results = {}
    tokens = torch.load(jobs["tokens"])
    for name, job in jobs["models"].items():
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["dir"], trust_remote_code=True).eval()
        with torch.no_grad():
            output = model(input_ids=tokens)
            results[name] = {"class": type(model).__name__,
                             "output": output.logits if job["auto"] != "AutoModel" else output.last_hidden_state}
            if job["auto"] != "AutoModel":  # the cache holds each layer's own number of key/value heads
                results[name]["generated"] = model.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False)
    torch.save(results, jobs["out"])
""")


def _shrunk(model_type: str):
    encoder = model_type in ENCODERS
    model = tiny_encoder(model_type) if encoder else tiny_causal_lm(model_type)
    example = {"input_ids": TOKENS[:1, :4]} if encoder else lm_example_inputs()
    prune_structure(model, 0.3, example_inputs=example, importance="l2", allocation={"name": "global", "round_to": 1})
    return model


def _widths(model) -> set[tuple]:
    adapter = adapter_for(model)
    return {(width, layout.num_heads, layout.num_kv_heads)
            for width, layout in zip(adapter.mlp_widths(), adapter.attention_layouts())}


@pytest.fixture(scope="module")
def loaded_without_prunekit(tmp_path_factory):
    """Every family shrunk non-uniformly, saved, and loaded back in one subprocess without prunekit."""
    root = tmp_path_factory.mktemp("remote_code")
    torch.save(TOKENS, root / "tokens.pt")
    models, expected, jobs = {}, {}, {}
    for model_type in FAMILIES:
        model = models[model_type] = _shrunk(model_type)
        directory = root / model_type
        directory.mkdir()
        report = save_structured(model, directory, adapter=adapter_for(model))
        encoder = model_type in ENCODERS
        with torch.no_grad():
            output = model(input_ids=TOKENS)
            expected[model_type] = {"output": output.last_hidden_state if encoder else output.logits, "report": report}
            if not encoder:
                expected[model_type]["generated"] = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
        jobs[model_type] = {"dir": str(directory), "auto": "AutoModel" if encoder else "AutoModelForCausalLM"}
    spec = {"tokens": str(root / "tokens.pt"), "out": str(root / "results.pt"), "models": jobs}
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return models, expected, torch.load(root / "results.pt"), root


@pytest.mark.parametrize("model_type", FAMILIES)
def test_plain_transformers_rebuilds_every_family_exactly(loaded_without_prunekit, model_type):
    models, expected, got, root = loaded_without_prunekit
    assert len(_widths(models[model_type])) > 1  # widths or head counts really differ by layer
    report = expected[model_type]["report"]
    assert not report.from_pretrained and report.remote_code
    assert got[model_type]["class"] == f"Shrunk{type(models[model_type]).__name__}"
    assert torch.equal(got[model_type]["output"], expected[model_type]["output"])
    if "generated" in expected[model_type]:
        assert torch.equal(got[model_type]["generated"], expected[model_type]["generated"])
    with torch.no_grad():  # prunekit's own loader reads the same directory
        again = prunekit.load(root / model_type)(input_ids=TOKENS)
    assert torch.equal(again.logits if hasattr(again, "logits") else again.last_hidden_state,
                       expected[model_type]["output"])


def test_the_code_is_self_contained_and_the_config_the_familys_own(loaded_without_prunekit):
    _, _, _, root = loaded_without_prunekit
    source = (root / "llama" / MODELING_FILE).read_text()
    assert "import prunekit" not in source and "from prunekit" not in source
    config = json.loads((root / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_shrunk.ShrunkLlamaForCausalLM"}
    resized = {name.rsplit(".", 1)[-1] for name in config["shrunk_shapes"]}
    assert {"gate_proj", "up_proj", "down_proj"} <= resized


def test_without_trust_remote_code_the_familys_class_refuses_the_shapes(loaded_without_prunekit):
    _, _, _, root = loaded_without_prunekit
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loudly, never re-initialised quietly
        AutoModelForCausalLM.from_pretrained(root / "llama")


def test_a_model_read_back_and_shrunk_to_uniform_widths_drops_the_code(loaded_without_prunekit, tmp_path):
    """The shapes a config carries describe one model: saved again with uniform widths, plain
    from_pretrained loads it and no stale shapes or code reference are left behind."""
    _, _, _, root = loaded_without_prunekit
    model = prunekit.load(root / "llama")
    graph = build_graph(model, lm_example_inputs(), adapter=adapter_for(model))
    adapter = adapter_for(model)
    layers = [(width, layout.num_kv_heads) for width, layout in zip(adapter.mlp_widths(), adapter.attention_layouts())]
    narrowest = min(w for w, _ in layers), min(kv for _, kv in layers)
    removal = {}
    for index, (width, kv_heads) in enumerate(layers):
        removal[f"model.layers.{index}.mlp"] = list(range(width - narrowest[0]))
        removal[f"model.layers.{index}.self_attn"] = list(range(kv_heads - narrowest[1]))
    shrink(graph, {name: units for name, units in removal.items() if units}, adapter=adapter_for(model))
    assert len(_widths(model)) == 1
    report = save_structured(model, tmp_path, adapter=adapter_for(model))
    config = json.loads((tmp_path / "config.json").read_text())
    assert report.from_pretrained and "auto_map" not in config and "shrunk_shapes" not in config
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=TOKENS).logits,
                           model(input_ids=TOKENS).logits)

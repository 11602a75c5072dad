"""``prunekit export --to gguf``: the file read back with the gguf package holds the model's tensors and
widths (per layer for a shrunk model), and transformers' own GGUF reader rebuilds the unpruned one exactly."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from prunekit.cli import main
from prunekit.io.gguf_writer import unpermute_rotary
from prunekit.models import adapter_for
from prunekit.structure import lm_example_inputs
from prunekit.structure.graph import build_graph
from prunekit.structure.saving import save_structured
from prunekit.structure.shrink import shrink
from prunekit.tools.support.tiny import tiny_causal_lm

TOKENS = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(3))


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            for t in reader.tensors}


def _export(source, out, *extra) -> GGUFReader:
    assert main(["export", str(source), "--out", str(out), *extra]) == 0
    return GGUFReader(out / "model.gguf")


def _expected(model, names) -> dict[str, np.ndarray]:
    """The model's tensors under their GGUF names (the tied head is the embedding, written once)."""
    expected = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        expected[names.get_name(key, try_suffixes=(".weight", ".bias"))] = tensor.float().numpy()
    return expected


def _read_model_tensors(reader, widths) -> dict[str, np.ndarray]:
    """The file's tensors with the rotary reordering of queries and keys undone."""
    tensors = _tensors(reader)
    for name, array in tensors.items():
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            layer = int(name.split(".")[1])
            tensors[name] = unpermute_rotary(array, widths[layer][1 if ".attn_q." in name else 2])
    return tensors


def _widths(model) -> list[tuple[int, int, int]]:
    head_dim = model.model.layers[0].self_attn.head_dim
    return [(l.mlp.gate_proj.out_features, l.self_attn.q_proj.out_features // head_dim,
             l.self_attn.k_proj.out_features // head_dim) for l in model.model.layers]


def test_a_dense_llama_round_trips_exactly_and_transformers_reads_it(tiny_model_dir, tmp_path, tokenizer):
    reader = _export(tiny_model_dir, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == config.num_hidden_layers
    assert _field(reader, "llama.feed_forward_length") == config.intermediate_size
    assert _field(reader, "llama.attention.head_count") == config.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "llama.attention.key_length") == config.head_dim
    assert _field(reader, "llama.embedding_length") == config.hidden_size
    assert _field(reader, "llama.context_length") == config.max_position_embeddings
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.tokens") == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(json.loads((tiny_model_dir / "tokenizer.json")
                                                                           .read_text())["model"]["merges"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    got, expected = _read_model_tensors(reader, _widths(model)), _expected(model, names)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    # An independent reader: transformers' GGUF loader undoes the reordering and rebuilds the same model.
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["gguf"]["architecture"] == "llama"
    assert "type: f32" in (tmp_path / "out" / "recipe.yaml").read_text()


@pytest.fixture()
def shrunk_dir(tmp_path, tokenizer):
    """A tiny Llama shrunk with widths and KV-head counts that differ by layer, saved with its tokenizer."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), num_hidden_layers=3, hidden_size=64,
                           intermediate_size=160, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    graph = build_graph(model, lm_example_inputs(), adapter=adapter_for(model))
    mlps = sorted((f for f in graph.families if f.kind == "channels" and "mlp" in f.name), key=lambda f: f.name)
    heads = sorted((f for f in graph.families if f.kind == "heads"), key=lambda f: f.name)
    removal = {f.name: list(range(16 * (i + 1))) for i, f in enumerate(mlps)}
    removal.update({f.name: list(range(i)) for i, f in enumerate(heads) if i})  # KV groups: 4, 3, 2 kept
    shrink(graph, removal, adapter=adapter_for(model))
    widths = _widths(model)
    assert len({w[0] for w in widths}) > 1 and len({w[2] for w in widths}) > 1
    path = tmp_path / "shrunk"
    path.mkdir()
    save_structured(model, path, tokenizer, adapter=adapter_for(model))
    return path, model


def test_a_shrunk_llama_carries_its_widths_per_layer(shrunk_dir, tmp_path):
    path, model = shrunk_dir
    reader = _export(path, tmp_path / "out")
    widths = _widths(model)
    # llama.cpp's llama architecture builds every layer with the first width; deci reads the arrays per layer.
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.feed_forward_length") == [w[0] for w in widths]
    assert _field(reader, "deci.attention.head_count") == [w[1] for w in widths]
    assert _field(reader, "deci.attention.head_count_kv") == [w[2] for w in widths]
    assert _field(reader, "deci.attention.key_length") == model.model.layers[0].self_attn.head_dim
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(widths))
    got, expected = _read_model_tensors(reader, widths), _expected(model, names)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)


def test_f16_and_q8_0_hold_the_weights_within_their_precision(shrunk_dir, tmp_path):
    path, model = shrunk_dir
    widths = _widths(model)
    expected = _expected(model, gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(widths)))
    half = _read_model_tensors(_export(path, tmp_path / "f16", "--type", "f16"), widths)
    for name, array in expected.items():
        want = array if array.ndim == 1 else array.astype(np.float16).astype(np.float32)
        assert np.array_equal(half[name], want), name
    reader = _export(path, tmp_path / "q8", "--type", "q8_0")
    types = {t.name: t.tensor_type for t in reader.tensors}
    q8 = _read_model_tensors(reader, widths)
    for name, array in expected.items():
        if array.ndim == 1:
            assert types[name] == gguf.GGMLQuantizationType.F32 and np.array_equal(q8[name], array)
        elif array.shape[-1] % 32:  # rows that are no whole number of Q8_0 blocks stay f16
            assert types[name] == gguf.GGMLQuantizationType.F16
        else:
            assert types[name] == gguf.GGMLQuantizationType.Q8_0
            blocks = np.abs(array.reshape(-1, 32)).max(axis=1, keepdims=True)
            error = np.abs(q8[name] - array).reshape(-1, 32)
            assert (error <= blocks / 127 * 0.5 + blocks * 1e-3 + 1e-8).all(), name  # half a step (+ f16 scale)
    assert any(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in types)
    assert json.loads((tmp_path / "q8" / "report.json").read_text())["gguf"]["tensor_types"]["Q8_0"] > 0


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return " ".join(lines[0].split())


def test_what_the_exporter_cannot_describe_is_refused_in_one_line(tiny_model_dir, tmp_path, tokenizer, capsys):
    other = tmp_path / "qwen"
    tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(bare)
    capsys.readouterr()  # what saving the inputs printed (progress bars)
    assert main(["export", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "writes Llama-family decoders" in _one_line(capsys) and not (tmp_path / "a").exists()
    assert main(["export", str(bare), "--out", str(tmp_path / "b")]) == 2
    assert "has no tokenizer" in _one_line(capsys) and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "c")]) == 2
    assert "already exists" in _one_line(capsys)
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "d"), "--type", "q4"]) == 2
    assert "type: Input should be 'f32', 'f16' or 'q8_0'" in _one_line(capsys)

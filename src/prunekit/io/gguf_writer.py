"""Writing a Llama-family decoder, unpruned, pruned or shrunk, as one GGUF file for llama.cpp.

The ``gguf`` package does the format: its writer, its tensor name map, its quantiser and its
readers of the tokenizer files. What is prunekit's is describing the model. llama.cpp's ``llama``
architecture reads one feed-forward length and one head count for all layers (its loader takes
arrays, but builds every layer with the first value); its ``deci`` architecture (DeciLM,
Nemotron-NAS) is the same decoder (RMSNorm, rotary position embedding, SwiGLU MLP) built layer by
layer from the arrays ``deci.feed_forward_length``, ``deci.attention.head_count`` and
``deci.attention.head_count_kv``. So a model whose widths are the same in every layer is written
as ``llama``, and one whose widths differ by layer as ``deci``, with those arrays.

As llama.cpp's own converter does, the query and key rows are reordered head by head: transformers
rotates the two halves of a head (``rotate_half``), llama.cpp's rotation of these architectures
rotates adjacent pairs. Norms and biases stay float32; ``f16`` and ``q8_0`` apply to the matrices,
and a matrix whose rows are not a whole number of Q8_0 blocks (32 values) is written as f16.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError

GGUF_TYPES = ("f32", "f16", "q8_0")
LLAMA_FAMILIES = ("llama", "mistral")
Q8_0_BLOCK = 32


@dataclass
class LayerWidths:
    feed_forward: int
    heads: int
    kv_heads: int


@dataclass
class GgufSummary:
    """What was written: the architecture chosen, the widths of every layer, the tensor types used."""

    architecture: str
    layers: list[LayerWidths]
    head_dim: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    pre_tokenizer: str = ""
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "head_dim": self.head_dim, "pre_tokenizer": self.pre_tokenizer,
                "feed_forward_length": [layer.feed_forward for layer in self.layers],
                "head_count": [layer.heads for layer in self.layers],
                "head_count_kv": [layer.kv_heads for layer in self.layers],
                "tensor_types": self.tensor_types, "bytes": self.bytes}


def layer_widths(model: nn.Module) -> tuple[list[LayerWidths], int]:
    """Every decoder layer's MLP width and head counts, read from its tensors, and the head size."""
    layers = model.model.layers
    head_dim = int(layers[0].self_attn.head_dim)
    widths = []
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        widths.append(LayerWidths(int(mlp.gate_proj.out_features), int(attention.q_proj.out_features) // head_dim,
                                  int(attention.k_proj.out_features) // head_dim))
    return widths, head_dim


def check_exportable(model: nn.Module) -> None:
    """Refuse, in one line, a model this exporter cannot describe to llama.cpp."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILIES:
        raise PrunekitError(f"the GGUF export writes Llama-family decoders ({', '.join(LLAMA_FAMILIES)}); this model "
                            f"is a {model_type or type(model).__name__}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PrunekitError(f"the GGUF export writes the default rotary embedding; this model uses "
                            f"'{rope.get('rope_type')}' scaling")
    if getattr(config, "sliding_window", None) is not None:
        raise PrunekitError("the GGUF export writes full attention; this model attends through a sliding window")
    heads = {int(layer.self_attn.head_dim) for layer in model.model.layers}
    if len(heads) != 1:
        raise PrunekitError("the GGUF export needs one head size in every layer")


def pre_tokenizer_of(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenisation, where its structure says it unambiguously."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regular expression, then bytes
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's expression
    return None


def _permute_rotary(tensor: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from (first half, second half) to interleaved pairs, the order llama.cpp rotates."""
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def unpermute_rotary(tensor: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of the reordering above (for reading an exported file back)."""
    return tensor.reshape(heads, tensor.shape[0] // heads // 2, 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _encode(array: np.ndarray, gguf_type: str):
    """The tensor's data and its GGML type, by the rules in the module docstring."""
    import gguf

    if array.ndim < 2 or gguf_type == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gguf_type == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int, pre_tokenizer: str | None) -> str:
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise PrunekitError(f"{tokenizer_dir} has no tokenizer.json: the GGUF file needs the model's tokenizer")
    tokenizer_json = json.loads(tokenizer_file.read_text())
    try:
        vocab = BpeVocab(tokenizer_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise PrunekitError(f"the GGUF export writes byte-level BPE tokenizers; {tokenizer_file} is not one "
                            f"({exc})") from None
    pre = pre_tokenizer or pre_tokenizer_of(tokenizer_json)
    if pre is None:
        raise PrunekitError("llama.cpp needs the name of the tokenizer's pre-tokenisation, which its structure does "
                            "not tell here: give it as pre_tokenizer (for example gpt-2, llama-bpe, qwen2)")
    tokens, types = [], []
    for text, _, token_type in vocab.all_tokens():
        tokens.append(text)
        types.append(token_type)
    if len(tokens) > vocab_size:
        raise PrunekitError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows")
    for index in range(len(tokens), vocab_size):  # embedding rows no token uses (padding to a round size)
        tokens.append(f"[PAD{index}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return pre


def write_gguf(model: nn.Module, tokenizer_dir: str | os.PathLike, path: str | os.PathLike, gguf_type: str = "f32",
               name: str | None = None, pre_tokenizer: str | None = None) -> GgufSummary:
    """Write ``model`` (a Llama-family causal LM) and the tokenizer in ``tokenizer_dir`` to the GGUF file ``path``."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise PrunekitError(f"unknown GGUF type '{gguf_type}'; choose one of {', '.join(GGUF_TYPES)}")
    check_exportable(model)
    config = model.config
    widths, head_dim = layer_widths(model)
    uniform = len({(w.feed_forward, w.heads, w.kv_heads) for w in widths}) == 1
    architecture = gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI
    arch_name = gguf.MODEL_ARCH_NAMES[architecture]
    names = gguf.get_tensor_name_map(architecture, len(widths))
    embedding = model.get_input_embeddings()
    vocab_size = int(embedding.num_embeddings)

    writer = gguf.GGUFWriter(str(path), arch_name)
    try:
        writer.add_name(name or getattr(config, "name_or_path", "") or "model")
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(embedding.embedding_dim))
        writer.add_block_count(len(widths))
        if uniform:
            writer.add_feed_forward_length(widths[0].feed_forward)
            writer.add_head_count(widths[0].heads)
            writer.add_head_count_kv(widths[0].kv_heads)
        else:
            writer.add_feed_forward_length([w.feed_forward for w in widths])
            writer.add_head_count([w.heads for w in widths])
            writer.add_head_count_kv([w.kv_heads for w in widths])
        # Said explicitly: after heads are removed, hidden size / head count is no longer the head size.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        pre = _add_tokenizer(writer, Path(tokenizer_dir), vocab_size, pre_tokenizer)

        types: Counter = Counter()
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embedding.weight
        for key, tensor in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp reuses the token embedding when the file has no output matrix
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise PrunekitError(f"the GGUF export does not know where the tensor {key} goes")
            array = tensor.detach().to(torch.float32).cpu().numpy()
            if key.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                index = int(key.split(".layers.")[1].split(".")[0])
                heads = widths[index].heads if ".q_proj." in key else widths[index].kv_heads
                array = _permute_rotary(array, heads)
            data, data_type = _encode(array, gguf_type)
            types[data_type.name] += 1
            writer.add_tensor(target, data, raw_dtype=data_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return GgufSummary(arch_name, widths, head_dim, dict(sorted(types.items())), pre, Path(path).stat().st_size)


__all__ = ["GGUF_TYPES", "GgufSummary", "LayerWidths", "check_exportable", "layer_widths", "pre_tokenizer_of",
           "unpermute_rotary", "write_gguf"]

"""Tiny random models of architectures transformers ships, built from their own configs.

Real checkpoints measure quality; these measure coverage: every family is built with a few
blocks, a small width and a small vocabulary, so a whole pruning run takes a blink.
"""

from __future__ import annotations

import inspect

import torch

VOCAB = 256
# Every name families use for the same sizes; each config takes the ones it knows.
_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=128, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64, n_embd=64, n_layer=2,
    n_head=4, n_positions=128, ffn_dim=128, d_model=64, n_inner=128, rotary_dim=8, num_layers=2,
    ffn_hidden_size=128, n_heads=4, n_kv_heads=2, d_ff=128, num_kv_heads=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, sliding_window=16, word_embed_proj_dim=64, embedding_size=64, attention_head_size=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    conv_L_cache=3, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2, mamba_chunk_size=16,
    type_vocab_size=2, dim=64, hidden_dim=128, n_layers=2,
)
# Per-family settings where the generic ones do not build (hybrid layer plans, divisibility rules).
_FAMILY = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "bamba": dict(attn_layer_indices=[1], mamba_n_groups=1, mamba_d_conv=4, mamba_d_head=32),
    "falcon_h1": dict(mamba_n_groups=1, mamba_d_conv=4, mamba_d_ssm=64, projectors_bias=False),
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window_pattern=2),
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0),
    "codegen": dict(n_head=4, rotary_dim=8),
    "deepseek_v3": dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, n_group=1,
                        topk_group=1, first_k_dense_replace=1),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "distilbert": dict(dim=64, hidden_dim=128, n_heads=4, n_layers=2),
    "albert": dict(embedding_size=32, num_hidden_groups=1, inner_group_num=1),
    "deberta-v2": dict(position_buckets=16, max_relative_positions=32),
}


def tiny_config(model_type: str, **extra):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    accepted = set(inspect.signature(config_cls.__init__).parameters)
    fields = getattr(config_cls, "__dataclass_fields__", None) or {}
    accepted |= set(fields)
    settings = {key: value for key, value in {**_SMALL, **_FAMILY.get(model_type, {}), **extra}.items()
                if key in accepted or key in _FAMILY.get(model_type, {}) or key in extra}
    config = AutoConfig.for_model(model_type, **settings)
    for key, value in {**_SMALL, **_FAMILY.get(model_type, {})}.items():
        if key not in settings and hasattr(config, key) and not isinstance(getattr(config, key), (list, dict)):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    return config


def tiny_causal_lm(model_type: str, seed: int = 0, **extra) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **extra)).eval()


def tiny_encoder(model_type: str, seed: int = 0, **extra) -> torch.nn.Module:
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config(model_type, **extra)).eval()


# Decoder families the coverage test builds: dense, mixtures of experts (fused and not), hybrids with
# convolutions or state-space layers, fused query/key/value projections, GPT-2's Conv1D.
DECODERS = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "stablelm", "olmo2", "granite", "cohere",
    "starcoder2", "lfm2", "bloom", "gpt_bigcode", "granitemoe", "olmoe", "gpt_oss", "codegen", "persimmon",
    "xglm", "biogpt", "smollm3", "helium", "exaone4", "seed_oss", "ernie4_5", "jamba", "bamba", "falcon_h1",
    "deepseek_v3", "glm4",
)
ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "albert")


def _classifiers() -> dict:
    from prunekit.models.vision import InceptionNet, MobileNetSE, VGGNet
    from prunekit.structure.zoo import DenseNetLike, ResNetLike

    return {
        "residual (ResNet basic blocks)": lambda: ResNetLike(widths=(16, 32, 32), blocks=(1, 1, 1)),
        "plain (VGG)": lambda: VGGNet(widths=(16, 32), convs_per_stage=(1, 2), hidden=64, image_size=16),
        "depthwise-separable + squeeze-excitation (MobileNet)":
            lambda: MobileNetSE(stem=16, blocks=((32, 2, 2), (32, 1, 2), (48, 2, 2)), head=64),
        "grouped convolutions + concatenation (Inception)":
            lambda: InceptionNet(stem=16, blocks=((16, 32, 4, 8), (32, 64, 4, 8))),
        "dense concatenation (DenseNet)": lambda: DenseNetLike(growth=16, layers=2),
    }


def tiny_classifier(shape: str, seed: int = 0) -> torch.nn.Module:
    """A small random CNN of one of the shapes in ``CLASSIFIERS`` (1-channel 16×16 images, 10 classes)."""
    torch.manual_seed(seed)
    return _classifiers()[shape]().eval()


def classifier_batch(count: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 16, 16, generator=generator), torch.randint(0, 10, (count,), generator=generator)


# Plain nn.Module CNNs (no config, no family file): every shape the structural tracer must follow.
CLASSIFIERS = (
    "residual (ResNet basic blocks)", "plain (VGG)", "depthwise-separable + squeeze-excitation (MobileNet)",
    "grouped convolutions + concatenation (Inception)", "dense concatenation (DenseNet)",
)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of any architecture of the coverage lists, encoder or decoder."""
    return (tiny_encoder if model_type in ENCODERS else tiny_causal_lm)(model_type, seed)

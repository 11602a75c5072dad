"""Tiny random models of the architectures transformers ships (the library's own factory, for tests)."""

from prunekit.tools.support.tiny import DECODERS, ENCODERS, tiny_causal_lm, tiny_config, tiny_encoder

__all__ = ["DECODERS", "ENCODERS", "tiny_causal_lm", "tiny_config", "tiny_encoder"]

"""Optimizer state precision: codecs that store state tensors in fp32, bf16,
block-wise 8-bit (``q8``), 4-bit (``q4``) or FP8 (``fp8``, optionally with
COAT's dynamic range expansion), decoded to fp32 around each update.

See :mod:`optimkit.state.codecs` for the formats and the codec interface.
"""
from .codecs import (BF16, CODECS, FP8, FP32, Q4, Q8, Codec, available_codecs, get_codec,
                     stochastic_round_bf16)
from .maps import dynamic_map, linear_map

__all__ = ["Codec", "FP32", "BF16", "Q8", "Q4", "FP8", "CODECS", "get_codec", "available_codecs",
           "stochastic_round_bf16", "dynamic_map", "linear_map"]

"""Activation memory mechanisms (K2 §2.4.3): FP8 storage of saved activations, selective recomputation,
activation offload, and the routed experts' projection whose weight gradient can wait (weight_grads.py)."""

from k2train.memory.fp8 import (
    Fp8Tiles,
    dequantize_tiles,
    fp8_saved_grouped_mm,
    fp8_saved_linear,
    fp8_saved_swiglu,
    quantize_tiles,
    saved_bytes,
)

__all__ = [
    "Fp8Tiles",
    "dequantize_tiles",
    "fp8_saved_grouped_mm",
    "fp8_saved_linear",
    "fp8_saved_swiglu",
    "quantize_tiles",
    "saved_bytes",
]

"""Triton fast paths for the GPU (docs/ARCHITECTURE.md#h200-limits): attention that reports max logits, FP8 tiles,
Newton–Schulz. Each has an eager torch reference elsewhere in k2train that it is tested against;
callers choose the kernel by the tensor's device (`use_triton`), never by a flag.

On CPU the suite runs the kernels under `TRITON_INTERPRET=1` at tiny sizes.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel serves a tensor: on CUDA when Triton is installed."""
    return t.is_cuda and triton_available()

"""The FP8 tile format of saved activations (K2 §2.4.3): E4M3 values in 1×128 tiles, one FP32 scale each.

A leaf module: the eager reference (k2train/memory/fp8.py) and the fused Triton kernels
(k2train/kernels/fp8_tiles.py) both read the format from here, so neither imports the other's
constants and the kernels import nothing from k2train/memory.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_FLOOR = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal FP32
TILE = 128  # K2 §2.4.3: 1×128 tiles

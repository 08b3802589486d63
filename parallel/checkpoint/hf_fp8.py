"""FP8 block weights as the released Kimi-K2 / DeepSeek-V3 checkpoints store them.

A quantised matrix `W` [rows, cols] is stored as `...weight` in float8_e4m3fn and
`...weight_scale_inv` in float32 of shape [ceil(rows / 128), ceil(cols / 128)]: one scale per
128 x 128 block, the last block row and column ragged. Despite its name the stored scale is the
multiplier: W ~= weight * scale_inv, blockwise (DeepSeek-V3's `weight_dequant`). Dequantisation
here computes that product in float32, which is exact for every E4M3 value times a float32 scale
up to one float32 rounding, and then rounds once to the training dtype.

`quantize_fp8_block` writes the same convention (scale = block amax / 448), so tests build such
checkpoints themselves. Any other quantised dtype is refused by the reader (`parallel/checkpoint/hf_source.py`).
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_SUFFIX = "_scale_inv"


def scale_name(weight_name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `model.layers.3.mlp.down_proj.weight_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The scale grid of a [rows, cols] weight: one float32 per 128 x 128 block, ragged edges."""
    rows, cols = shape
    return math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)


def dequantize_fp8_block(weight_RC: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                         row_start: int = 0) -> torch.Tensor:
    """weight * scale_inv blockwise, in float32, rounded once to `dtype`.

    `weight_RC` may be rows [row_start, row_start + R) of the stored matrix; `scale_inv` is then
    the scale rows that cover them, starting at block row row_start // 128.
    """
    rows, cols = weight_RC.shape
    first_block = row_start // BLOCK
    out_RC = torch.empty(rows, cols, dtype=dtype)
    # One block row at a time, so the float32 temporaries stay 128 rows whatever the matrix.
    edges = [row_start, *range((first_block + 1) * BLOCK, row_start + rows, BLOCK), row_start + rows]
    for a, b in zip(edges, edges[1:]):
        scale_C = scale_inv[a // BLOCK - first_block].float().repeat_interleave(BLOCK)[:cols]
        out_RC[a - row_start:b - row_start] = (weight_RC[a - row_start:b - row_start].float() * scale_C).to(dtype)
    return out_RC


def quantize_fp8_block(w_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) of a matrix, one scale per 128 x 128 block,
    chosen as block amax / 448 so the block's largest element maps to E4M3's largest value."""
    rows, cols = w_RC.shape
    grid_r, grid_c = scale_shape((rows, cols))
    padded = torch.zeros(grid_r * BLOCK, grid_c * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w_RC.float()
    blocks = padded.view(grid_r, BLOCK, grid_c, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).to(FP8_DTYPE).view(grid_r * BLOCK, grid_c * BLOCK)
    return q[:rows, :cols].contiguous(), scale.contiguous()


def e4m3_error_bound(w_RC: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Per element, the most E4M3 rounding can move a value: half a unit in the last of 3 mantissa
    bits (2^-4 relative) for normal values, half the smallest subnormal (2^-10 x scale) below them."""
    rows, cols = w_RC.shape
    scale_RC = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return w_RC.float().abs() * 2.0 ** -4 + scale_RC * 2.0 ** -10

"""FP8 tile quantise / dequantise in one pass each (K2 §2.4.3; docs/ARCHITECTURE.md#h200-limits).

The eager `quantize_tiles` in k2train/memory/fp8.py is the reference: pad, amax, divide, clamp and
cast each run as their own kernel over the whole activation, which on an H200 moves 272 GB/s of a
4245 GB/s memory (docs/ARCHITECTURE.md#h200-limits). Here one program loads a [BLOCK_M, tile] block of rows once,
takes each row's amax, scales, clamps, rounds and stores the FP8 data and the FP32 scale; the
dequantise kernel reads FP8 + scale and writes the compute dtype. Inputs are [..., K] tensors,
flattened to [M, K] rows; K need not divide by the tile (the last tile of a row is masked).

Same numbers as the reference, on purpose:
- amax propagates NaN (taken over the bit patterns; a float max would drop it), so a tile with a
  NaN gets a NaN scale and one with ±inf an inf scale: the whole tile dequantises to NaN;
- scale = amax / 448 and y = x / scale are IEEE divisions (`div_rn`), as torch divides; the scale is
  floored at 2^-126 by a comparison that keeps NaN; y is clamped to ±448 the same way;
- y is rounded to the E4M3 grid (round to nearest, ties to even) in FP32 before the cast, so the
  cast only ever sees representable values and is exact whatever the backend's conversion does with
  ties and subnormals (the CPU interpreter truncates those; the GPU's cvt rounds them).
The data and scales therefore equal the reference's bit for bit, NaN payloads aside.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from k2train.kernels.fp8_format import E4M3_MAX, FP8_DTYPE, SCALE_FLOOR

_E4M3_MAX = tl.constexpr(float(E4M3_MAX))
_SCALE_FLOOR = tl.constexpr(float(SCALE_FLOOR))
# Elements per program: 32 rows of a 128-wide tile, 8 KiB of bf16 in flight per program, enough to
# keep the memory system busy with many programs per SM; wider tiles get fewer rows.
BLOCK_ELEMENTS = 4096


@triton.jit
def _round_to_e4m3_grid(y):
    """y (FP32, |y| <= 448 or NaN) rounded to the nearest E4M3 value, ties to even.

    The grid spacing of E4M3 at |y| in [2^e, 2^(e+1)) is q = 2^(e-3) (3 mantissa bits), and 2^-9
    below 2^-6 (subnormals). Adding 1.5·2^23·q puts |y| in a binade whose FP32 ulp is q, so the
    FP32 add rounds it to a multiple of q with ties to even; subtracting gives the rounded value.
    """
    a = tl.abs(y)
    exponent = (a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)  # biased; 0 for 0 and subnormals
    q_exponent = tl.maximum(exponent - 3, 127 - 9)
    magic = (((q_exponent + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5·2^23·q
    r = (a + magic) - magic
    sign = (y.to(tl.uint32, bitcast=True) >> 31) << 31
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _tile_block(M, K, num_tiles, TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's tile: its index along K, its rows, which rows exist, the element mask and the
    element offsets of its [BLOCK_M, BLOCK_T] block (BLOCK_T >= TILE, the excess masked).
    Consecutive programs take consecutive tiles of one row block, so together they stream a
    contiguous [BLOCK_M, K] slab of memory."""
    tile_index = tl.program_id(0) % num_tiles
    rows = (tl.program_id(0) // num_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_tile = tl.arange(0, BLOCK_T)
    cols = tile_index * TILE + in_tile
    row_ok = rows < M
    mask = row_ok[:, None] & ((in_tile < TILE) & (cols < K))[None, :]
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    return tile_index, rows, row_ok, mask, offsets


@triton.jit
def _quantize_kernel(x_ptr, data_ptr, scales_ptr, M, K, num_tiles,
                     TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    tile_index, rows, row_ok, mask, offsets = _tile_block(M, K, num_tiles, TILE, BLOCK_M, BLOCK_T)
    # Masked lanes read 0, which never raises an amax (the reference zero-pads the same way).
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # The amax as an integer max over the bits of |x|: non-negative floats order like their bit
    # patterns, and every NaN pattern lies above inf's, so a NaN in the tile wins (a float max drops it).
    amax_bits = tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1)
    amax = amax_bits.to(tl.float32, bitcast=True)
    scale = tl.div_rn(amax, _E4M3_MAX)
    scale = tl.where(scale < _SCALE_FLOOR, _SCALE_FLOOR, scale)  # NaN < floor is false: NaN stays
    y = tl.div_rn(x, scale[:, None])
    y = tl.where(y > _E4M3_MAX, _E4M3_MAX, y)
    y = tl.where(y < -_E4M3_MAX, -_E4M3_MAX, y)
    q = _round_to_e4m3_grid(y)
    tl.store(data_ptr + offsets, q.to(tl.float8e4nv), mask=mask)
    tl.store(scales_ptr + rows.to(tl.int64) * num_tiles + tile_index, scale, mask=row_ok)


@triton.jit
def _dequantize_kernel(data_ptr, scales_ptr, out_ptr, M, K, num_tiles,
                       TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    tile_index, rows, row_ok, mask, offsets = _tile_block(M, K, num_tiles, TILE, BLOCK_M, BLOCK_T)
    q = tl.load(data_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + rows.to(tl.int64) * num_tiles + tile_index, mask=row_ok, other=1.0)
    # The product is formed in FP32 and rounded once to the output dtype, as the reference does.
    out = q * scale[:, None]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, M: int, K: int, tile: int, *tensors: torch.Tensor) -> None:
    """One program per (block of rows, tile), tiles of a row block consecutive."""
    block_t = triton.next_power_of_2(tile)
    block_m = max(1, min(32, BLOCK_ELEMENTS // block_t))
    num_tiles = math.ceil(K / tile)
    grid = (triton.cdiv(M, block_m) * num_tiles,)
    kernel[grid](*tensors, M, K, num_tiles, TILE=tile, BLOCK_M=block_m, BLOCK_T=block_t)


def quantize_tiles_triton(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (data float8_e4m3fn [..., K], scales float32 [..., ceil(K / tile)]).

    The caller (`k2train.memory.fp8.quantize_tiles`) has checked the dtype and the tile.
    """
    K = x.shape[-1]
    num_tiles = math.ceil(K / tile)
    data = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((*x.shape[:-1], num_tiles), dtype=torch.float32, device=x.device)
    M = x.numel() // K if K else 0
    if M == 0 or K == 0:
        return data, scales
    _launch(_quantize_kernel, M, K, tile, x.reshape(M, K).contiguous(), data, scales)
    return data, scales


def dequantize_tiles_triton(data: torch.Tensor, scales: torch.Tensor, tile: int, dtype: torch.dtype) -> torch.Tensor:
    """(data [..., K], scales [..., ceil(K / tile)]) -> data·scale in `dtype`, shape [..., K]."""
    K = data.shape[-1]
    num_tiles = math.ceil(K / tile)
    if scales.shape != (*data.shape[:-1], num_tiles):
        raise ValueError(
            f"dequantize_tiles got scales of shape {tuple(scales.shape)} for data {tuple(data.shape)} and tile "
            f"{tile}; expected {(*data.shape[:-1], num_tiles)}."
        )
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    M = data.numel() // K if K else 0
    if M == 0 or K == 0:
        return out
    _launch(_dequantize_kernel, M, K, tile, data.contiguous(), scales.contiguous(), out)
    return out

"""FP8 activation storage (K2 §2.4.3).

K2 keeps the inputs of the MoE up-projections and of SwiGLU for backward as FP8-E4M3 in 1×128 tiles
with one FP32 scale per tile, while every GEMM stays in the compute dtype (BF16): only what waits for
backward is compressed. This file holds the building blocks:

- `quantize_tiles` / `dequantize_tiles`: the tile format (its constants in k2train/kernels/fp8_format.py);
  the pure torch code here is the reference, and on a GPU fused Triton kernels
  (k2train/kernels/fp8_tiles.py) produce the same bits;
- `fp8_saved_linear`, `fp8_saved_swiglu`, `fp8_saved_grouped_mm`: autograd functions whose forward
  is the plain op, bit for bit, and which save their activation inputs as FP8 tiles;
- `saved_bytes`: the exact count of bytes autograd keeps for backward, taken by saved-tensor hooks.

Error of the round trip. E4M3 has 3 mantissa bits and rounds to nearest, so a normal value y is kept
within half a unit in the last place: |q - y| <= 2^-4 |y|; below the smallest normal 2^-6 the spacing
is 2^-9, so |q - y| <= 2^-10. A tile is stored as y = x / s with s = amax / 448, hence |y| <= 448,
whose largest spacing is 32 (in [256, 448]), and
    |dequant(x) - x| <= max(2^-4 |x|, 2^-10 s)    and, per tile,    <= 16 s = amax(tile) / 28,
up to FP32 rounding (a few 2^-24 relative). The tests assert exactly these bounds; random data
reaches amax / 28.

Special values, on purpose:
- an all-zero tile gets the floor scale (below) and dequantises to exact zeros;
- a tile holding ±inf or NaN gets a non-finite scale (inf / 448 = inf, NaN propagates through amax),
  so the whole tile dequantises to NaN: a diverging step stays visible in the gradients instead of
  being saturated to ±448 by the FP8 cast;
- huge finite values (up to the FP32 maximum) are fine: the scale is amax / 448, a division that
  cannot overflow, and 448 * scale stays finite (checked for every FP32 value in [2^127, max]);
- tiny tiles: the scale is floored at the smallest normal FP32 (2^-126) so that it never underflows
  to zero or to a subnormal with few significant bits; the elementwise bound keeps its form with
  s = 2^-126, so such a tile's error is at most max(2^-4 * amax, 2^-136) (FP32 itself only has
  spacing 2^-149 down there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from k2train.kernels import use_triton
from k2train.kernels.fp8_format import E4M3_MAX, FP8_DTYPE, SCALE_FLOOR, TILE
from k2train.memory.weight_grads import grouped_weight_grad

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Fp8Tiles:
    """A tensor x of shape [..., K] stored as FP8-E4M3 tiles of `tile` consecutive elements along K.

    data:   float8_e4m3fn [..., K], x / scale of its tile (no padding is stored);
    scales: float32 [..., ceil(K / tile)], amax(|tile|) / 448 (floored at 2^-126);
    dtype:  the dtype x had, which `dequantize_tiles` returns by default.
    """

    data: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype
    tile: int

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


def fp8_kernels_serve(t: torch.Tensor) -> bool:
    """The fused Triton kernels (k2train/kernels/fp8_tiles.py) serve CUDA tensors on GPUs with FP8
    conversions (compute capability 8.9 and up: Ada, Hopper); everything else runs the eager code."""
    return use_triton(t) and torch.cuda.get_device_capability(t.device) >= (8, 9)


def quantize_tiles(x: torch.Tensor, tile: int = TILE) -> Fp8Tiles:
    """x [..., K] (float32, bfloat16 or float16) -> FP8 tiles of 1 × `tile` along K, one FP32 scale each.

    When K % tile != 0 the last tile of each row is shorter: it is zero-padded for the amax only
    (zeros never raise an amax) and the padding is dropped before storing. On a GPU one fused
    Triton kernel does it, with the same bits as the eager reference below.
    """
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"quantize_tiles got a tensor of dtype {x.dtype}; expected one of {_INPUT_DTYPES}.")
    if x.dim() == 0 or tile <= 0:
        raise ValueError(
            f"quantize_tiles needs a tensor with a last dim and tile > 0; got shape {tuple(x.shape)}, tile {tile}."
        )
    if fp8_kernels_serve(x):
        from k2train.kernels.fp8_tiles import quantize_tiles_triton

        data, scales = quantize_tiles_triton(x, tile)
        return Fp8Tiles(data=data, scales=scales, dtype=x.dtype, tile=tile)
    return quantize_tiles_eager(x, tile)


def quantize_tiles_eager(x: torch.Tensor, tile: int) -> Fp8Tiles:
    """The reference of `quantize_tiles`, in plain torch (any device)."""
    K = x.shape[-1]
    num_tiles = math.ceil(K / tile)
    x32 = F.pad(x.float(), (0, num_tiles * tile - K))
    x_tiles = x32.unflatten(-1, (num_tiles, tile))  # [..., T, tile]
    amax = x_tiles.abs().amax(dim=-1)  # [..., T]; NaN propagates, inf stays inf
    scales = (amax / E4M3_MAX).clamp_min(SCALE_FLOOR)
    # |x / s| <= 448 up to one FP32 rounding; the clamp makes the overflow rule ours rather than the
    # cast's (torch's CPU cast saturates, so without the non-finite scale an inf would become 448).
    y = (x_tiles / scales.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    data = y.to(FP8_DTYPE).flatten(-2)[..., :K].contiguous()
    return Fp8Tiles(data=data, scales=scales, dtype=x.dtype, tile=tile)


def dequantize_tiles(t: Fp8Tiles, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fp8Tiles -> a tensor of shape t.shape and dtype `dtype` (default: the dtype that was quantised).

    The product q * scale is formed in FP32 and rounded once to the output dtype.
    """
    if fp8_kernels_serve(t.data):
        from k2train.kernels.fp8_tiles import dequantize_tiles_triton

        return dequantize_tiles_triton(t.data, t.scales, t.tile, dtype or t.dtype)
    return dequantize_tiles_eager(t, dtype)


def dequantize_tiles_eager(t: Fp8Tiles, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference of `dequantize_tiles`, in plain torch (any device)."""
    K = t.data.shape[-1]
    scales = t.scales.repeat_interleave(t.tile, dim=-1)[..., :K]  # [..., K]: each element's scale
    return (t.data.float() * scales).to(dtype or t.dtype)


def _fp8_if(needed: bool, x: torch.Tensor, tile: int, shared: Fp8Tiles | None = None
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(data, scales) of x's FP8 tiles for `save_for_backward`, or (None, None) if no gradient reads x.

    They go through save_for_backward, not ctx attributes, so saved-tensor hooks (the byte count,
    CPU offload) see them. `shared` is x already quantised by the caller for several ops (gate and
    up read the same x): every op then saves the same storage, which is kept, counted and
    offloaded once.
    """
    if not needed:
        return None, None
    packed = quantize_tiles(x, tile) if shared is None else shared
    return packed.data, packed.scales


def quantize_shared_input(x: torch.Tensor, *weights: torch.Tensor, tile: int = TILE) -> Fp8Tiles | None:
    """x quantised once for every op in `weights`' layer that saves it (the gate and up
    projections), or None when no weight will need a gradient (nothing is saved then)."""
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return None
    with torch.no_grad():  # a copy for backward, not part of the graph
        return quantize_tiles(x, tile)


def unpack_saved(data: torch.Tensor | None, scales: torch.Tensor | None, dtype: torch.dtype, tile: int) -> torch.Tensor:
    """Rebuild a saved activation in the compute dtype from what `save_for_backward` kept."""
    assert data is not None and scales is not None, "the FP8 copy was not saved although a gradient needs it"
    return dequantize_tiles(Fp8Tiles(data, scales, dtype, tile))


class _Fp8SavedLinear(torch.autograd.Function):
    """y = x @ weightᵀ; x is saved as FP8 tiles along its last (input-feature) dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tile: int, shared: Fp8Tiles | None) -> torch.Tensor:
        # Only grad_weight reads x, so x is quantised only when the weight needs a gradient.
        ctx.save_for_backward(weight, *_fp8_if(ctx.needs_input_grad[1], x, tile, shared))
        ctx.x_dtype, ctx.tile = x.dtype, tile
        return F.linear(x, weight)

    @staticmethod
    @once_differentiable  # the backward uses dequantised copies: no double backward
    def backward(ctx, grad_y: torch.Tensor):
        weight, data, scales = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight)  # exact: what autograd computes for F.linear
        if ctx.needs_input_grad[1]:
            x = unpack_saved(data, scales, ctx.x_dtype, ctx.tile)
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w, None, None


def swiglu_grads(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dtypes) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dgate and d/dup of silu(gate)·up at float32 gate and up, rounded once to each input's dtype."""
    grad = grad_h.float()
    sig = torch.sigmoid(gate)
    grad_up = grad * gate * sig
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))  # silu'(g) = σ(g)(1 + g(1 - σ(g)))
    return grad_gate.to(dtypes[0]), grad_up.to(dtypes[1])


class _Fp8SavedSwiGLU(torch.autograd.Function):
    """h = silu(gate) * up; gate and up are saved as FP8 tiles along their last dim."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, tile: int) -> torch.Tensor:
        if any(ctx.needs_input_grad[:2]):
            g, u = quantize_tiles(gate, tile), quantize_tiles(up, tile)
            ctx.save_for_backward(g.data, g.scales, u.data, u.scales)
        ctx.dtypes, ctx.tile = (gate.dtype, up.dtype), tile
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable  # the backward uses dequantised copies: no double backward
    def backward(ctx, grad_h: torch.Tensor):
        g_data, g_scales, u_data, u_scales = ctx.saved_tensors
        # Elementwise math in FP32 (no GEMM here), rounded once to each input's dtype.
        gate = unpack_saved(g_data, g_scales, torch.float32, ctx.tile)
        up = unpack_saved(u_data, u_scales, torch.float32, ctx.tile)
        grad_gate, grad_up = swiglu_grads(grad_h, gate, up, ctx.dtypes)
        return grad_gate if ctx.needs_input_grad[0] else None, grad_up if ctx.needs_input_grad[1] else None, None


class _Fp8SavedGroupedMm(torch.autograd.Function):
    """out_NI = torch._grouped_mm(x_ND, w_EDI, offs); x_ND is saved as FP8 tiles along D."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDI: torch.Tensor, offs: torch.Tensor, tile: int,
                shared: Fp8Tiles | None) -> torch.Tensor:
        ctx.save_for_backward(w_EDI, offs, *_fp8_if(ctx.needs_input_grad[1], x_ND, tile, shared))
        ctx.x_dtype, ctx.tile = x_ND.dtype, tile
        return torch._grouped_mm(x_ND, w_EDI, offs=offs)

    @staticmethod
    @once_differentiable  # the backward uses dequantised copies: no double backward
    def backward(ctx, grad_NI: torch.Tensor):
        w_EDI, offs, data, scales = ctx.saved_tensors
        grad_NI = grad_NI.contiguous()  # _grouped_mm needs 16-byte aligned strides, not e.g. expanded ones
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NI, w_EDI.transpose(-2, -1), offs=offs)
        if ctx.needs_input_grad[1]:
            # Per group e: grad_w[e] = x_eᵀ grad_e from the dequantised x, now or deferred under the
            # dispatch's exchange (weight_grads.py).
            grad_w = grouped_weight_grad(ctx, 1, lambda: unpack_saved(data, scales, ctx.x_dtype, ctx.tile), grad_NI,
                                         w_EDI, offs)
        return grad_x, grad_w, None, None, None


def fp8_saved_linear(x: torch.Tensor, weight: torch.Tensor, tile: int = TILE,
                     shared: Fp8Tiles | None = None) -> torch.Tensor:
    """x [..., K] @ weight [M, K]ᵀ -> [..., M], computed exactly; x waits for backward as FP8 tiles
    (`shared`: x's tiles from `quantize_shared_input`, when other ops save the same x).

    grad_x = grad @ weight is exact; grad_weight = gradᵀ @ dequant(x), both in x's dtype.
    """
    return _Fp8SavedLinear.apply(x, weight, tile, shared)


def fp8_saved_swiglu(gate: torch.Tensor, up: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., I], computed exactly; both wait for backward as FP8 tiles."""
    return _Fp8SavedSwiGLU.apply(gate, up, tile)


def fp8_saved_grouped_mm(x_ND: torch.Tensor, w_EDI: torch.Tensor, offs: torch.Tensor, tile: int = TILE,
                         shared: Fp8Tiles | None = None) -> torch.Tensor:
    """torch._grouped_mm(x_ND, w_EDI, offs=offs) -> out_NI, computed exactly; x_ND waits as FP8 tiles
    (`shared`: x_ND's tiles from `quantize_shared_input`, when other ops save the same x_ND).

    x_ND: rows sorted by group, group e owns rows offs[e-1]:offs[e]; w_EDI: one [D, I] matrix per
    group (e.g. the transposed view of a [E, I, D] expert weight); offs: int32 cumulative row counts.
    grad_x is exact; grad_w uses the dequantised x, through the same _grouped_mm calls torch uses.
    """
    return _Fp8SavedGroupedMm.apply(x_ND, w_EDI, offs, tile, shared)


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def saved_bytes(fn: Callable[..., object], *inputs: object, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that autograd saves for backward while running fn(*inputs).

    Every tensor packed by `torch.autograd.graph.saved_tensors_hooks` is counted by the storage it
    keeps alive, each storage once (a view and its base, or a tensor saved twice, count once).
    Storages shared with a tensor in `exclude` (typically the parameters, which live anyway) are
    not counted. Saved tensors are held until fn returns so that no address is reused mid-count.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: set[tuple[torch.device, int]] = set()
    held: list[torch.Tensor] = []
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        held.append(t)
        key = _storage_key(t)
        if key not in seen and key not in excluded:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total

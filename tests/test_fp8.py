"""FP8 activation storage (K2 §2.4.3): the 1×128 tile format, the FP8-saving autograd functions and
the saved-bytes count.

The round-trip bound, derived in k2train/memory/fp8.py: E4M3 rounds to nearest with 3 mantissa bits,
so after scaling a tile by s = amax / 448 each element is off by at most max(2^-4 |x|, 2^-10 s)
(half an ulp in the normal range, half the subnormal spacing 2^-9 below it); per tile by at most
16 s = amax / 28 (half the spacing 32 of E4M3's top binade [256, 448]), and by max(2^-4 amax, 2^-136)
where the scale is floored at 2^-126. FP32 rounding adds a few 2^-24 relative (slack 2^-20) and,
for subnormal results, 2^-149 absolute.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from k2train.memory.fp8 import (
    SCALE_FLOOR,
    Fp8Tiles,
    dequantize_tiles,
    fp8_saved_grouped_mm,
    fp8_saved_linear,
    fp8_saved_swiglu,
    quantize_tiles,
    saved_bytes,
)

FMAX = torch.finfo(torch.float32).max
SLACK = 1 + 2**-20


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _element_scales(t: Fp8Tiles) -> torch.Tensor:
    return t.scales.double().repeat_interleave(t.tile, dim=-1)[..., : t.shape[-1]]


def _bound(x: torch.Tensor, t: Fp8Tiles) -> torch.Tensor:
    """Elementwise float64 bound on |dequant(x) - x| (module docstring)."""
    return torch.maximum(2**-4 * x.double().abs(), 2**-10 * _element_scales(t)) * SLACK + 2**-149


def _assert_round_trip_bound(x: torch.Tensor, tile: int = 128) -> Fp8Tiles:
    """Quantise x, check the elementwise bound and the per-tile 2^-4 * amax bound; return the tiles."""
    t = quantize_tiles(x, tile)
    err = (dequantize_tiles(t, torch.float32).double() - x.double()).abs()
    assert bool((err <= _bound(x, t)).all()), f"max excess {(err - _bound(x, t)).max().item()}"
    K, T = x.shape[-1], t.scales.shape[-1]
    amax = F.pad(x.double().abs(), (0, T * tile - K)).unflatten(-1, (T, tile)).amax(-1)
    tile_err = F.pad(err, (0, T * tile - K)).unflatten(-1, (T, tile)).amax(-1)
    scales = t.scales.double()
    floored = t.scales == SCALE_FLOOR
    assert bool((tile_err <= 16 * scales * SLACK + 2**-149).all())
    assert bool((tile_err[~floored] <= amax[~floored] / 28 * SLACK).all())
    assert bool((tile_err[floored] <= torch.clamp_min(2**-4 * amax[floored], 2**-136) * SLACK + 2**-149).all())
    return t


# --- the tile format ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [128, 384, 200, 129, 1])
def test_round_trip_within_half_ulp_bound(K):
    # Rows of very different magnitudes: the scale must follow each tile.
    x = _randn(5, 3, K) * torch.logspace(-20, 20, 5).view(5, 1, 1)
    t = _assert_round_trip_bound(x)
    T = math.ceil(K / 128)
    assert t.data.dtype == torch.float8_e4m3fn and t.shape == x.shape and t.scales.shape == (5, 3, T)
    # The short last tile's scale comes from its own elements only: the padding never raises it.
    amax = F.pad(x.abs(), (0, T * 128 - K)).unflatten(-1, (T, 128)).amax(-1)
    assert torch.equal(t.scales, amax / 448)


def test_bounds_are_tight():
    # Random data reaches the per-tile bound amax / 28 and, elementwise, the supremum of the relative
    # error 2^-4 / (1 + 2^-4) = 1/17 (at y = 1 + 2^-4 times a power of 2, halfway between two
    # E4M3 values): the storage really has 3 mantissa bits, rounded to nearest.
    x = _randn(64, 1024, seed=1)
    t = quantize_tiles(x)
    err = (dequantize_tiles(t) - x).abs()
    ratio = (err.unflatten(-1, (8, 128)).amax(-1) / (t.scales * 448)).max().item()
    assert 0.99 / 28 < ratio <= SLACK / 28
    normal = x.abs() >= 2**-6 * t.scales.repeat_interleave(128, dim=-1)
    assert 0.99 / 17 < (err / x.abs())[normal].max().item() <= SLACK / 17


def test_bf16_input_round_trip():
    x = _randn(4, 200, seed=2, dtype=torch.bfloat16) * 1e3
    t = _assert_round_trip_bound(x)
    y = dequantize_tiles(t)
    # The default output is bf16: one more rounding of at most 2^-9 relative to the FP32 result.
    assert y.dtype == torch.bfloat16
    err = (y.double() - x.double()).abs()
    assert bool((err <= _bound(x, t) * (1 + 2**-9) + 2**-9 * x.double().abs()).all())


def test_zero_tiles_are_exact_zeros():
    x = torch.cat([torch.zeros(3, 128), _randn(3, 72, seed=3), torch.zeros(3, 5)], dim=-1)
    x[1] = 0.0
    t = _assert_round_trip_bound(x)
    y = dequantize_tiles(t)
    assert torch.isfinite(t.scales).all() and (t.scales > 0).all()
    assert torch.equal(y[:, :128], torch.zeros(3, 128)) and torch.equal(y[1], torch.zeros(205))
    assert torch.equal(dequantize_tiles(quantize_tiles(torch.zeros(2, 1))), torch.zeros(2, 1))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_tile_dequantises_to_nan(bad, dtype):
    x = _randn(2, 300, seed=4).to(dtype)
    x[0, 5] = bad
    t = quantize_tiles(x)
    y = dequantize_tiles(t, torch.float32)
    # The whole tile is non-finite (the FP8 cast alone would have saturated an inf to 448)...
    assert not torch.isfinite(t.scales[0, 0]) and torch.isnan(y[0, :128]).all()
    # ...and nothing else is touched.
    rest = x.clone()
    rest[0, :128] = 0.0
    y_rest = dequantize_tiles(quantize_tiles(rest), torch.float32)
    assert torch.equal(y[0, 128:], y_rest[0, 128:]) and torch.equal(y[1], y_rest[1])


@pytest.mark.parametrize("big", [1e30, FMAX, -FMAX])
def test_huge_finite_values_stay_finite(big):
    x = _randn(3, 200, seed=5)
    x[0, 0] = big
    x[1, 130] = big
    x[2] = big * torch.linspace(-1, 1, 200)
    t = _assert_round_trip_bound(x)
    assert torch.isfinite(t.scales).all() and torch.isfinite(dequantize_tiles(t)).all()
    assert dequantize_tiles(t)[0, 0] == big


def test_bf16_max_stays_finite():
    big = torch.finfo(torch.bfloat16).max
    x = torch.full((2, 130), -big, dtype=torch.bfloat16)
    y = dequantize_tiles(_assert_round_trip_bound(x))
    assert torch.equal(y, x)


def test_tiny_and_subnormal_values():
    tiny = torch.tensor([2.0**-149, 1e-40, 1e-39, 1e-30])
    x = tiny.view(4, 1) * torch.rand(4, 256, generator=torch.Generator().manual_seed(6))
    x[:, 0] = tiny  # each row's amax, and the signs vary
    x[:, 1::2] *= -1
    t = _assert_round_trip_bound(x)
    y = dequantize_tiles(t)
    assert torch.isfinite(y).all()
    # Tiles below 448 * 2^-126 get the floor scale (their error bound is max(2^-4 amax, 2^-136),
    # checked above); the smallest subnormal, 2^-149 < 2^-10 * 2^-126, rounds to zero.
    assert (t.scales[:3] == SCALE_FLOOR).all() and (t.scales[3] > SCALE_FLOOR).all()
    assert (y[0] == 0).all() and (y[1:] != 0).any(dim=-1).all()


def test_nbytes_and_errors():
    t = quantize_tiles(_randn(6, 200), tile=64)
    assert t.nbytes == 6 * 200 + 6 * 4 * 4 and t.scales.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype torch.int64"):
        quantize_tiles(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="tile 0"):
        quantize_tiles(torch.ones(3, 4), tile=0)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        quantize_tiles(torch.tensor(1.0))


# --- autograd functions --------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]
# Derivatives of silu(z) = z σ(z): |silu'| <= 1.0999 (at z ≈ 2.4) and |silu''| <= 1/2 (at z = 0).
SILU_D1, SILU_D2 = 1.1, 0.5


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _dequantised(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequantize_tiles(quantize_tiles(x.detach()), dtype)


def test_silu_derivative_constants():
    z = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    s = torch.sigmoid(z)
    d1 = s * (1 + z * (1 - s))
    d2 = s * (1 - s) * (2 + z * (1 - 2 * s))
    assert d1.abs().max() <= SILU_D1 and d2.abs().max() <= SILU_D2 + 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_forward_exact_and_gradients(dtype):
    x, w = _leaf(_randn(2, 5, 200, seed=10, dtype=dtype)), _leaf(_randn(48, 200, seed=11, dtype=dtype) * 0.1)
    x_ref, w_ref = _leaf(x), _leaf(w)
    y, y_ref = fp8_saved_linear(x, w), F.linear(x_ref, w_ref)
    assert torch.equal(y, y_ref)
    g = _randn(*y.shape, seed=12, dtype=dtype)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    # grad_weight is the plain op's, evaluated on the dequantised x: the same GEMM, the same bits.
    w_deq = _leaf(w)
    F.linear(_dequantised(x), w_deq).backward(g)
    assert torch.equal(w.grad, w_deq.grad)
    # And its distance to the exact gradient is bounded by |g|ᵀ |x̃ - x| <= |g|ᵀ bound(x).
    if dtype == torch.float32:
        e = _bound(x, quantize_tiles(x.detach())).reshape(-1, 200)
        limit = g.double().reshape(-1, 48).abs().t() @ e
        assert bool(((w.grad - w_ref.grad).double().abs() <= limit * (1 + 1e-5) + 1e-6).all())


def test_linear_without_weight_grad_saves_no_fp8():
    x, w = _leaf(_randn(7, 256, seed=13)), _randn(16, 256, seed=14)
    assert saved_bytes(fp8_saved_linear, x, w, exclude=(w,)) == 0
    fp8_saved_linear(x, w).sum().backward()
    assert torch.equal(x.grad, torch.ones(7, 16) @ w)


def test_non_finite_activation_reaches_the_gradients():
    x, w = _leaf(_randn(4, 200, seed=15)), _leaf(_randn(8, 200, seed=16))
    x.data[2, 150] = math.inf
    fp8_saved_linear(x, w).sum().backward()
    assert torch.isnan(w.grad[:, 128:]).all() and torch.isfinite(w.grad[:, :128]).all()
    gate, up = _leaf(_randn(3, 130, seed=17)), _leaf(_randn(3, 130, seed=18))
    up.data[0, 0] = math.nan
    fp8_saved_swiglu(gate, up).sum().backward()
    assert torch.isnan(gate.grad[0, :128]).all() and torch.isfinite(gate.grad[1:]).all()


def _swiglu_grads_f64(gate: torch.Tensor, up: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, g = gate.double(), up.double(), g.double()
    s = torch.sigmoid(gate)
    return g * up * s * (1 + gate * (1 - s)), g * gate * s


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_forward_exact_and_gradients(dtype):
    gate, up = _leaf(_randn(6, 200, seed=20, dtype=dtype) * 3), _leaf(_randn(6, 200, seed=21, dtype=dtype))
    h = fp8_saved_swiglu(gate, up)
    assert torch.equal(h, F.silu(gate) * up)
    g = _randn(6, 200, seed=22, dtype=dtype)
    h.backward(g)
    # The backward formula at the dequantised inputs (in FP32, as the backward takes them), computed
    # in float64: equal up to FP32 arithmetic and one final rounding to the dtype.
    gg, gu = _swiglu_grads_f64(_dequantised(gate, torch.float32), _dequantised(up, torch.float32), g)
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(gate.grad.double(), gg, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(up.grad.double(), gu, rtol=rtol, atol=1e-6)
    # Distance to the exact gradient, from the quantisation bounds e_g, e_u and the silu constants.
    eg, eu = _bound(gate, quantize_tiles(gate.detach())), _bound(up, quantize_tiles(up.detach()))
    gg_true, gu_true = _swiglu_grads_f64(gate.detach(), up.detach(), g)
    lim_gate = g.double().abs() * (SILU_D1 * eu + SILU_D2 * up.double().abs() * eg)
    lim_up = g.double().abs() * SILU_D1 * eg
    for grad, true, lim in ((gate.grad, gg_true, lim_gate), (up.grad, gu_true, lim_up)):
        out_rounding = rtol * (true.abs() + lim) + 1e-6
        assert bool(((grad.double() - true).abs() <= lim + out_rounding).all())


def _grouped_inputs(dtype: torch.dtype, row_major_w: bool, counts: list[int], D: int, I: int):
    """Rows sorted over len(counts) groups, x [sum(counts), D], the weight as [E, D, I] or [E, I, D]."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    x = _leaf(_randn(sum(counts), D, seed=30, dtype=dtype))
    w = _randn(len(counts), D, I, seed=31, dtype=dtype) * 0.1
    # The model's expert weights are [E, I, D] and enter transposed (moe.py); check both orders.
    w = _leaf(w) if row_major_w else _leaf(w.transpose(-2, -1).contiguous())
    w_EDI = w if row_major_w else w.transpose(-2, -1)
    return x, w, w_EDI, offs, counts


# One empty group each; D = 136 has a short last tile. At the small shape torch's CPU kernel gives
# different FP32 bits for (xᵀ g) and (gᵀ x)ᵀ, so it checks the backward picks torch's order.
@pytest.mark.parametrize("counts, D, I", [([10, 0, 25, 5], 136, 48), ([0, 6, 4], 8, 16)])
@pytest.mark.parametrize("row_major_w", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_forward_exact_and_gradients(dtype, row_major_w, counts, D, I):
    x, w, w_EDI, offs, counts = _grouped_inputs(dtype, row_major_w, counts, D, I)
    x_ref, w_ref = _leaf(x), _leaf(w)
    w_ref_EDI = w_ref if row_major_w else w_ref.transpose(-2, -1)
    y, y_ref = fp8_saved_grouped_mm(x, w_EDI, offs), torch._grouped_mm(x_ref, w_ref_EDI, offs=offs)
    assert torch.equal(y, y_ref)
    g = _randn(*y.shape, seed=32, dtype=dtype)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    w_deq = _leaf(w)
    w_deq_EDI = w_deq if row_major_w else w_deq.transpose(-2, -1)
    torch._grouped_mm(_dequantised(x), w_deq_EDI, offs=offs).backward(g)
    assert torch.equal(w.grad, w_deq.grad)
    assert (w.grad[counts.index(0)] == 0).all()  # the empty group
    if dtype == torch.float32:
        e = _bound(x, quantize_tiles(x.detach()))
        limit_EDI = torch.stack([ee.t() @ ge.double().abs() for ge, ee in zip(g.split(counts), e.split(counts))])
        limit = limit_EDI if row_major_w else limit_EDI.transpose(-2, -1)
        assert bool(((w.grad - w_ref.grad).double().abs() <= limit * (1 + 1e-5) + 1e-6).all())


# --- saved bytes -------------------------------------------------------------------------------


def test_saved_bytes_counts_each_storage_once():
    a, b = _leaf(_randn(4, 32, seed=40)), _leaf(_randn(4, 32, seed=41))
    assert saved_bytes(lambda t: t * t, a) == a.nbytes  # saved twice, one storage
    assert saved_bytes(lambda t: t[:, :3].sin().sum() + t.cos().sum(), a) == a.nbytes  # a view and its base
    assert saved_bytes(lambda s, t: s * t, a, b) == a.nbytes + b.nbytes
    assert saved_bytes(lambda s, t: s * t, a, b, exclude=(b,)) == a.nbytes
    with torch.no_grad():
        assert saved_bytes(lambda s, t: s * t, a, b) == 0


def _fp8_bytes(rows: int, k: int) -> int:
    """One FP8 byte per element plus one FP32 scale per 1×128 tile."""
    return rows * k + rows * math.ceil(k / 128) * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_functions_save_a_half_or_quarter(dtype):
    T, K, I, b = 64, 256, 384, torch.finfo(dtype).bits // 8
    x, w = _leaf(_randn(T, K, seed=50, dtype=dtype)), _leaf(_randn(I, K, seed=51, dtype=dtype))
    assert saved_bytes(F.linear, x, w, exclude=(w,)) == T * K * b
    assert saved_bytes(fp8_saved_linear, x, w, exclude=(w,)) == _fp8_bytes(T, K)

    gate, up = _leaf(_randn(T, I, seed=52, dtype=dtype)), _leaf(_randn(T, I, seed=53, dtype=dtype))
    # The plain SwiGLU keeps gate (for silu), silu(gate) and up (for the product): 3 tensors.
    assert saved_bytes(lambda g, u: F.silu(g) * u, gate, up) == 3 * T * I * b
    assert saved_bytes(fp8_saved_swiglu, gate, up) == 2 * _fp8_bytes(T, I)

    offs = torch.tensor([20, 20, 50, 64], dtype=torch.int32)
    w_EDI = _leaf(_randn(4, I, K, seed=54, dtype=dtype)).transpose(-2, -1)
    assert saved_bytes(torch._grouped_mm, x, w_EDI, offs, exclude=(w_EDI, offs)) == T * K * b
    assert saved_bytes(fp8_saved_grouped_mm, x, w_EDI, offs, exclude=(w_EDI, offs)) == _fp8_bytes(T, K)
    # With K a multiple of 128, FP8 keeps (1 + 4/128) / b of the bytes: 0.258 of FP32, 0.516 of BF16.
    assert _fp8_bytes(T, K) / (T * K * b) == pytest.approx((1 + 4 / 128) / b)

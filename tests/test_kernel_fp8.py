"""The fused FP8 tile kernels (k2train/kernels/fp8_tiles.py) against the eager reference
(k2train/memory/fp8.py), on the Triton CPU interpreter at small sizes.

The kernels run in one child process started with TRITON_INTERPRET=1 (tests/triton_interpret.py);
it builds the inputs below from fixed seeds, saves what the kernels return, and the tests compare
that here with the reference on the same inputs.

What the interpreter can and cannot show. Its FP8 casts round differently from the GPU's (ties away
from zero, truncated subnormals; cf. triton-lang/triton#8322). The quantise kernel rounds to the
E4M3 grid itself before the cast, so the cast only sees representable values, which the interpreter
converts exactly: data and scales must equal the reference bit for bit. Two conversions of the
interpreter are not the GPU's and are tested for what they are: it encodes NaN as an arbitrary
finite byte and decodes the E4M3 NaN byte as 480 (so only that a non-finite tile stays non-finite
is checked here; the device benchmark checks the NaN bits on the GPU), and it truncates FP32 -> BF16
where the GPU rounds to nearest even (so a BF16 dequantisation must be one of those two roundings
of the exact FP32 product, and the nearest where both agree).
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpret import run_interpreted

from k2train.memory import fp8
from k2train.memory.fp8 import Fp8Tiles, dequantize_tiles_eager, quantize_tiles_eager

FMAX = torch.finfo(torch.float32).max
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale_per_row = torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)  # amaxes over six decades
    return (torch.randn(*shape, generator=gen) * scale_per_row).to(dtype)


def _e4m3_values() -> torch.Tensor:
    """Every finite non-negative E4M3 value, ascending (0 .. 448)."""
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(fp8.FP8_DTYPE).float()  # 0x7F is NaN


def _grid_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose tiles have scale exactly 1 (448 leads each), holding every E4M3 value, every
    midpoint between neighbours (ties) and points just off them, both signs, subnormals included.
    Returns the rows, the values in order and a mask of the ties among them."""
    grid = _e4m3_values()
    mid = (grid[1:] + grid[:-1]) / 2
    off = torch.cat([mid * (1 - 2**-20), mid * (1 + 2**-20)])
    values = torch.cat([grid, mid, off])
    ties = torch.zeros(len(values), dtype=torch.bool)
    ties[len(grid) : len(grid) + len(mid)] = True
    values, ties = torch.cat([values, -values]), torch.cat([ties, ties])
    body = torch.zeros(-(-len(values) // 127) * 127)
    body[: len(values)] = values
    body = body.view(-1, 127)
    return torch.cat([torch.full((len(body), 1), 448.0), body], dim=1), values, ties


def _special_rows() -> torch.Tensor:
    nan, inf = float("nan"), float("inf")
    rows = torch.zeros(10, 256)
    rows[1] = -0.0  # negative zeros: floor scale, -0 bytes
    rows[2, 5], rows[2, 200] = inf, 3.0  # inf: inf scale in its tile; the other tile is finite
    rows[3, 7] = -inf
    rows[4, 9], rows[4, 10] = nan, 1.0
    rows[5, 0], rows[5, 1] = nan, inf
    rows[6, :3] = torch.tensor([FMAX, -FMAX, 1.0])  # huge but finite
    rows[7] = torch.linspace(-3e38, 3e38, 256)
    rows[8] = torch.linspace(-1e-40, 1e-40, 256)  # FP32 subnormals: floor scale 2^-126
    rows[9, 1:] = torch.randn(255, generator=torch.Generator().manual_seed(5))
    return rows


def _with_non_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[[3, 11, 500]] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=x.dtype)
    return x


# 40 rows span two 32-row programs; K = 300 ends in a 44-wide tile; K = 100 < tile is one short
# tile; tile = 100 is not a power of two (the block is 128 wide, masked to 100); tile = 256 makes
# 16-row programs.
QUANTIZE = {
    "bf16_40x300": lambda: (_randn(40, 300, seed=1, dtype=torch.bfloat16), 128),
    "fp32_40x300": lambda: (_randn(40, 300, seed=2), 128),
    "fp16_2x3x256": lambda: (_randn(2, 3, 256, seed=3, dtype=torch.float16), 128),
    "bf16_5x100": lambda: (_randn(5, 100, seed=4, dtype=torch.bfloat16), 128),
    "fp32_33x90_tile32": lambda: (_randn(33, 90, seed=5), 32),
    "bf16_9x250_tile100": lambda: (_randn(9, 250, seed=6, dtype=torch.bfloat16), 100),
    "fp32_20x600_tile256": lambda: (_randn(20, 600, seed=10), 256),  # 16 rows per program
    "grid": lambda: (_grid_rows()[0], 128),
    "special": lambda: (_special_rows(), 128),
    "empty_rows": lambda: (torch.zeros(0, 300), 128),
    "empty_k": lambda: (torch.zeros(4, 0), 128),
    "empty_middle": lambda: (torch.zeros(3, 0, 7), 128),
}
DEQUANTIZE = {
    "bf16_40x300": lambda: (_with_non_finite(_randn(40, 300, seed=7, dtype=torch.bfloat16)), 128),
    "bf16_6x2x64": lambda: (_with_non_finite(_randn(6, 2, 64, seed=8, dtype=torch.bfloat16)), 128),
    "bf16_9x250_tile100": lambda: (_with_non_finite(_randn(9, 250, seed=9, dtype=torch.bfloat16)), 100),
}


def _run_kernels(path: str) -> None:
    """In the interpreted child: every case through the kernels, saved to `path`."""
    from k2train.kernels.fp8_tiles import dequantize_tiles_triton, quantize_tiles_triton

    results = {}
    for name, case in QUANTIZE.items():
        results["q", name] = quantize_tiles_triton(*case())
    for name, case in DEQUANTIZE.items():
        x, tile = case()
        ref = quantize_tiles_eager(x, tile)
        for dtype in OUT_DTYPES:
            results["dq", name, dtype] = dequantize_tiles_triton(ref.data, ref.scales, tile, dtype)
    torch.save(results, path)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> dict:
    return run_interpreted(__file__, tmp_path_factory)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _assert_same_tiles(kernel: dict, name: str) -> tuple[torch.Tensor, torch.Tensor, Fp8Tiles]:
    """Kernel vs reference: scales equal (NaN where the reference has NaN), data equal byte for byte
    except where the reference holds NaN (which the interpreter cannot encode)."""
    x, tile = QUANTIZE[name]()
    data, scales = kernel["q", name]
    ref = quantize_tiles_eager(x, tile)
    assert data.dtype == fp8.FP8_DTYPE and data.shape == ref.data.shape
    assert scales.dtype == torch.float32 and scales.shape == ref.scales.shape
    torch.testing.assert_close(scales, ref.scales, rtol=0, atol=0, equal_nan=True)
    nan_ref = torch.isnan(ref.data.float())
    assert torch.equal(_bytes(data)[~nan_ref], _bytes(ref.data)[~nan_ref])
    return data, scales, ref


@pytest.mark.parametrize("name", [n for n in QUANTIZE if n not in ("grid", "special")])
def test_quantize_equals_reference(kernel, name):
    _assert_same_tiles(kernel, name)


def test_quantize_rounds_to_nearest_even_on_the_whole_grid(kernel):
    data, scales, _ = _assert_same_tiles(kernel, "grid")
    _, values, ties = _grid_rows()
    assert torch.equal(scales, torch.ones_like(scales))
    codes = _bytes(data[:, 1:]).flatten()[: len(values)]
    assert ((codes[ties] & 1) == 0).all()  # ties went to the even neighbour


def test_special_values(kernel):
    data, scales, ref = _assert_same_tiles(kernel, "special")
    inf = float("inf")
    assert torch.equal(scales[0], torch.full((2,), fp8.SCALE_FLOOR))
    assert torch.equal(_bytes(data[1]), torch.full((256,), 0x80, dtype=torch.uint8))
    assert scales[2, 0] == inf and scales[2, 1] == 3.0 / 448 and scales[3, 0] == inf
    assert torch.isnan(scales[4, 0]) and torch.isnan(scales[5, 0])
    # Dequantising the kernel's tiles with the reference: every finite tile equals the reference's
    # round trip; a non-finite tile stays non-finite (NaN throughout on the GPU; here the bytes the
    # interpreter wrote for NaN are finite, so an inf input comes back as ±inf times its byte).
    back = dequantize_tiles_eager(Fp8Tiles(data, scales, torch.float32, 128))
    expected = dequantize_tiles_eager(ref)
    non_finite = ~torch.isfinite(scales).repeat_interleave(128, dim=-1)
    assert torch.isnan(expected[non_finite]).all() and not torch.isfinite(back[non_finite]).any()
    assert torch.equal(back[~non_finite], expected[~non_finite])


def _bf16_roundings(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 v rounded to BF16 to nearest even (torch, the GPU) and toward zero (the interpreter)."""
    truncated = (v.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return v.to(torch.bfloat16), truncated


@pytest.mark.parametrize("name", list(DEQUANTIZE))
def test_dequantize_equals_reference(kernel, name):
    x, tile = DEQUANTIZE[name]()
    ref = quantize_tiles_eager(x, tile)
    finite = torch.isfinite(ref.scales).repeat_interleave(tile, dim=-1)[..., : x.shape[-1]]
    assert not finite.all()

    exact = dequantize_tiles_eager(ref, torch.float32)
    got32 = kernel["dq", name, torch.float32]
    assert got32.shape == x.shape and torch.equal(got32[finite], exact[finite])
    assert not torch.isfinite(got32[~finite]).any()
    got16 = kernel["dq", name, torch.float16]
    assert torch.equal(got16[finite], dequantize_tiles_eager(ref, torch.float16)[finite])
    got_bf16 = kernel["dq", name, torch.bfloat16]
    nearest, truncated = _bf16_roundings(exact)
    assert ((got_bf16 == nearest) | (got_bf16 == truncated))[finite].all()
    agree = finite & (nearest == truncated)
    assert torch.equal(got_bf16[agree], nearest[agree])


@pytest.mark.parametrize("name", ["empty_rows", "empty_k", "empty_middle"])
def test_empty_tensors_dequantize(name):
    # No program is launched for an empty tensor, so this runs here (no interpreter needed).
    from k2train.kernels.fp8_tiles import dequantize_tiles_triton

    x, tile = QUANTIZE[name]()
    ref = quantize_tiles_eager(x, tile)
    assert dequantize_tiles_triton(ref.data, ref.scales, tile, torch.bfloat16).shape == x.shape


def test_cpu_tensors_take_the_eager_path():
    # The kernel is chosen by device: a CPU tensor never reaches Triton, whatever the environment.
    assert not fp8.fp8_kernels_serve(torch.zeros(4, 128))
    x = _randn(4, 300, seed=1)
    assert torch.equal(fp8.quantize_tiles(x).scales, quantize_tiles_eager(x, 128).scales)


if __name__ == "__main__":
    _run_kernels(sys.argv[1])

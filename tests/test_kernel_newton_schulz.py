"""The GPU Newton–Schulz (k2train/kernels/newton_schulz.py) against the eager reference
(k2train/optim/newton_schulz.py), with the symmetric-product kernel on the Triton CPU interpreter.

The kernels run in one child process started with TRITON_INTERPRET=1 (tests/triton_interpret.py),
with 16 × 16 blocks so that the tiny matrices below, not multiples of the block, span several: every
kind of program of the triangle (full, partial, diagonal) runs. FP32 is compared tightly (only the
summation order differs); 16-bit loosely: products round differently, so the iteration's accuracy
band is asserted. The kernel's 16-bit path runs here in FP16: Triton 3.9's interpreter multiplies
BF16 operands of `tl.dot` as their raw 16-bit patterns (triton-lang/triton#11584; BF16 is not
supported there), so a BF16 run on it says nothing about the kernel; the code is the same for both
dtypes, and the device benchmark checks BF16 against the FP32 iteration on the GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpret import run_interpreted

from k2train.optim.newton_schulz import K2_NS_COEFFICIENTS, newton_schulz_eager, newton_schulz

NS_SHAPES = [(3, 32, 48), (2, 40, 24)]  # wide; tall (iterated transposed)
GRAM_SHAPES = [(3, 40, 24), (2, 24, 40), (1, 16, 16), (2, 5, 70)]
B_COEF, C_COEF = K2_NS_COEFFICIENTS[1:]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ns_input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return _randn(*shape, seed=sum(shape)).to(dtype)


def _run_kernels(path: str) -> None:
    """In the interpreted child: the Gram products and the iterations, saved to `path`."""
    import k2train.kernels.newton_schulz as ns

    ns.default_blocks = lambda N, K: (16, 16)  # several blocks even at these sizes
    results = {}
    for shape in GRAM_SHAPES:
        P = _randn(*shape, seed=sum(shape))
        A = ns.gram(P)
        S = A / shape[-1]  # a symmetric C, as in b·A + c·A·A
        results["gram", shape] = (A, ns.gram(S, C=S, alpha=C_COEF, beta=B_COEF), ns.gram(P.half()))
    results["gram_strided"] = ns.gram(_randn(2, 48, 20, seed=9).mT)
    for shape in NS_SHAPES:
        for symmetric, dtype in [(False, torch.float32), (True, torch.float32), (True, torch.float16)]:
            G = _ns_input(shape, dtype)
            results["ns", shape, symmetric, dtype] = ns.newton_schulz_fast(
                G, 5, K2_NS_COEFFICIENTS, dtype=dtype, symmetric=symmetric
            )
    torch.save(results, path)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> dict:
    return run_interpreted(__file__, tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", GRAM_SHAPES)
def test_gram_is_the_symmetric_product(kernel, shape):
    P = _randn(*shape, seed=sum(shape))
    A, fused, half = kernel["gram", shape]
    assert torch.equal(A, A.mT)  # mirrored blocks: exactly symmetric
    assert _rel(A, P @ P.mT) < 1e-6
    S = A / shape[-1]
    assert torch.equal(fused, fused.mT)
    assert _rel(fused, torch.baddbmm(S, S, S.mT, beta=B_COEF, alpha=C_COEF)) < 1e-6
    assert half.dtype == torch.float16 and torch.equal(half, half.mT)
    assert _rel(half, P.half().float() @ P.half().float().mT) < 1e-3


def test_gram_of_a_strided_input(kernel):
    P = _randn(2, 48, 20, seed=9).mT  # [2, 20, 48], not contiguous
    assert _rel(kernel["gram_strided"], P @ P.mT) < 1e-6


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fast_newton_schulz_fp32_matches_reference(kernel, shape, symmetric):
    G = _ns_input(shape, torch.float32)
    got = kernel["ns", shape, symmetric, torch.float32]
    assert got.shape == G.shape and got.dtype == G.dtype
    assert _rel(got, newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.float32)) < 1e-5


@pytest.mark.parametrize("shape", NS_SHAPES)
def test_fast_newton_schulz_fp16_symmetric_matches_reference(kernel, shape):
    G = _ns_input(shape, torch.float16)
    got = kernel["ns", shape, True, torch.float16]
    ref = newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.float16)
    exact = newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.float64)
    assert got.dtype == torch.float16
    # The fp16 reference sits about 0.2% from the float64 iteration; the kernel in the same band,
    # a few fp16 roundings from the reference (it sums in another order).
    assert _rel(got, exact) < 0.005 and _rel(ref, exact) < 0.005
    assert _rel(got, ref) < 2e-3


@pytest.mark.parametrize("shape", NS_SHAPES)
def test_fast_newton_schulz_bf16_batched_gemms_match_reference(shape):
    # symmetric=False launches no Triton kernel: the batched products run here, in bf16, and are
    # the reference's; only the one-pass normalisation differs (in the norm's last bits at most).
    from k2train.kernels.newton_schulz import newton_schulz_fast

    G = _ns_input(shape, torch.bfloat16)
    ref = newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.bfloat16)
    exact = newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.float64)
    got = newton_schulz_fast(G, 5, K2_NS_COEFFICIENTS)
    assert got.dtype == torch.bfloat16 and _rel(got, exact) < 0.03
    assert _rel(got, ref) < 1e-3
    assert torch.equal(newton_schulz_fast(G, 0, K2_NS_COEFFICIENTS), newton_schulz_eager(G, 0, K2_NS_COEFFICIENTS, 1e-7,
                                                                                           torch.bfloat16))


def test_batch_dims_and_cpu_dispatch():
    from k2train.kernels.newton_schulz import newton_schulz_fast

    G = _randn(2, 3, 16, 40, seed=4)
    got = newton_schulz_fast(G, 5, K2_NS_COEFFICIENTS, dtype=torch.float32)
    assert _rel(got[1, 2], newton_schulz_fast(G[1, 2], 5, K2_NS_COEFFICIENTS, dtype=torch.float32)) < 1e-6
    # The kernel is chosen by device: on CPU the public function is the reference, bit for bit.
    assert torch.equal(newton_schulz(G), newton_schulz_eager(G, 5, K2_NS_COEFFICIENTS, 1e-7, torch.bfloat16))


if __name__ == "__main__":
    _run_kernels(sys.argv[1])

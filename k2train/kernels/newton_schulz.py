"""Newton–Schulz on the GPU (K2 §2.1, Algorithm 1; docs/ARCHITECTURE.md#h200-limits): batched bf16, optionally symmetric.

The eager `k2train.optim.newton_schulz` is the reference. On an H200 it runs 5 steps on the 24
expert matrices of a layer (24 × 2048×7168, bf16) at 544 TFLOP/s of a 779 TFLOP/s GEMM
(docs/ARCHITECTURE.md#h200-limits). Two things here go further:
- the normalisation reads G once and writes X once (the norm is accumulated in FP32 from G's own
  dtype and the division is rounded once into `dtype`), where the reference materialises an FP32
  copy and divides it; the iteration then runs in preallocated buffers, one batched cuBLAS GEMM
  per product, as the reference does;
- `symmetric=True` computes the two symmetric products of an iteration, A = X·Xᵀ and A·A (A is
  symmetric, so A·A = A·Aᵀ), with a Triton kernel (`gram`) that forms only the blocks on and above
  the diagonal and mirrors them. Per step on X [n, m], n <= m, that is n²m + n³ of the plain
  algorithm's 4n²m + 2n³ FLOPs not done: 28% at the K2 expert shape (m = 3.5 n).
Which of the two wins at K2 shapes is measured by `make bench-device`, not assumed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gram_kernel(p_ptr, c_ptr, out_ptr, N, K, alpha, beta,
                 stride_pb, stride_pn, stride_pk, stride_cb, stride_cn, stride_ob, stride_on,
                 HAS_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """out[b] = alpha·P[b]·P[b]ᵀ (+ beta·C[b]) for one block (i, j), i <= j, written to (i, j) and (j, i)."""
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # The t-th block of the upper triangle, numbered column by column: t = j(j+1)/2 + i, 0 <= i <= j.
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)  # the float root may be one off either way
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    i = t - j * (j + 1) // 2

    rows_i = i * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_j = j * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_base = p_ptr + batch * stride_pb
    a_ptrs = p_base + rows_i[:, None] * stride_pn + ks[None, :] * stride_pk
    b_ptrs = p_base + rows_j[:, None] * stride_pn + ks[None, :] * stride_pk
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=(rows_i < N)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(rows_j < N)[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_pk
        b_ptrs += BLOCK_K * stride_pk

    mask = (rows_i < N)[:, None] & (rows_j < N)[None, :]
    acc = acc * alpha
    if HAS_C:
        c = tl.load(c_ptr + batch * stride_cb + rows_i[:, None] * stride_cn + rows_j[None, :], mask=mask, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)  # one rounding of alpha·PPᵀ + beta·C, as baddbmm does
    o_base = out_ptr + batch * stride_ob
    # The elements on and above the diagonal, then their mirror below it. Off the diagonal (i < j)
    # that is the whole block twice; a diagonal block keeps only its upper half, so the result is
    # exactly symmetric whatever order tl.dot sums its (r, c) and (c, r) elements in (a CPU's BLAS
    # may differ between the two).
    upper = rows_i[:, None] <= rows_j[None, :]
    below = rows_i[:, None] < rows_j[None, :]
    tl.store(o_base + rows_i[:, None] * stride_on + rows_j[None, :], out, mask=mask & upper)
    tl.store(o_base + rows_j[:, None] * stride_on + rows_i[None, :], tl.trans(out), mask=tl.trans(mask & below))


def default_blocks(N: int, K: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): 128 × 64 tiles at training sizes, the smallest tl.dot tile (16) below."""
    return min(128, max(16, triton.next_power_of_2(N))), min(64, max(16, triton.next_power_of_2(K)))


def gram(P: Tensor, C: Tensor | None = None, alpha: float = 1.0, beta: float = 0.0, out: Tensor | None = None,
         blocks: tuple[int, int] | None = None, num_warps: int | None = None, num_stages: int = 3) -> Tensor:
    """alpha·P·Pᵀ + beta·C for P [B, N, K] and C [B, N, N] (symmetric): [B, N, N] in P's dtype.

    Only the blocks on and above the diagonal are computed; each is stored twice (mirrored; a
    diagonal block's upper half is mirrored into its lower half), so the result is exactly
    symmetric. C must be symmetric (only its upper blocks are read). FP32 inputs are multiplied in
    full FP32 (no TF32), as torch's own matmul does by default.
    """
    if P.ndim != 3 or (C is not None and C.shape != (P.shape[0], P.shape[1], P.shape[1])):
        raise ValueError(
            f"gram expects P [B, N, K] and C [B, N, N]; got P {tuple(P.shape)}, C {None if C is None else tuple(C.shape)}."
        )
    B, N, K = P.shape
    if out is None:
        out = torch.empty((B, N, N), dtype=P.dtype, device=P.device)
    if C is not None:
        C = C.contiguous()
    block_n, block_k = blocks or default_blocks(N, K)
    num_blocks = triton.cdiv(N, block_n)
    grid = (num_blocks * (num_blocks + 1) // 2, B)
    c_arg = C if C is not None else out  # not read when HAS_C is false
    _gram_kernel[grid](
        P, c_arg, out, N, K, float(alpha), float(beta),
        P.stride(0), P.stride(1), P.stride(2), c_arg.stride(0), c_arg.stride(1), out.stride(0), out.stride(1),
        HAS_C=C is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION="ieee" if P.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if block_n >= 128 else 4), num_stages=num_stages,
    )
    return out


def _normalised(G3: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """G3 [B, n, m] / (‖G3‖_F + eps) per matrix, in `dtype`, contiguous; one read, one write.

    The norm accumulates in FP32 from G3's own dtype; the quotient is formed in FP32 and rounded
    once into `dtype`, as the reference's `(G.float() / norm).to(dtype)` is.
    """
    norm = torch.linalg.vector_norm(G3, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    X = torch.empty(G3.shape, dtype=dtype, device=G3.device)
    return torch.div(G3, norm + eps, out=X)


def newton_schulz_fast(G: Tensor, steps: int, coefficients: tuple[float, float, float], eps: float = 1e-7,
                       dtype: torch.dtype = torch.bfloat16, symmetric: bool = False,
                       gram_options: dict | None = None) -> Tensor:
    """The reference's iteration on G [..., n, m] (K2 §2.1), in `dtype`; returns G's shape and dtype.

    Wide slices are iterated as they are, tall ones transposed, so A = X·Xᵀ is the small Gram
    matrix. `symmetric` computes A and b·A + c·A·A with `gram` (given `gram_options`: blocks,
    num_warps, num_stages); otherwise every product is one batched cuBLAS call, as in the reference.
    """
    gram_options = gram_options or {}
    a, b, c = coefficients
    n, m = G.shape[-2:]
    G3 = G.reshape(-1, n, m)
    transposed = n > m
    X = _normalised(G3.mT if transposed else G3, eps, dtype)
    batch, small, _ = X.shape
    A = X.new_empty(batch, small, small)
    B = torch.empty_like(A)
    Y = torch.empty_like(X)
    for _ in range(steps):
        if symmetric:
            gram(X, out=A, **gram_options)
            gram(A, C=A, alpha=c, beta=b, out=B, **gram_options)
        else:
            torch.bmm(X, X.mT, out=A)
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        torch.baddbmm(X, B, X, beta=a, out=Y)
        X, Y = Y, X
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)

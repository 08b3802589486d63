"""Newton–Schulz orthogonalisation, the core of Muon (K2 §2.1, Algorithm 1).

The quintic iteration `X <- a·X + (b·A + c·A·A)·X` with `A = X·Xᵀ` drives every singular value of a
Frobenius-normalised matrix towards a band around 1 without computing an SVD. The K2 coefficients
(3.4445, -4.7750, 2.0315) maximise the slope at zero, so five steps suffice, at the price of the
singular values landing in roughly [0.7, 1.2] instead of exactly 1 (measured in tests/test_optim.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from k2train.kernels import use_triton

K2_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = K2_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalise each matrix of `G` (shape [..., n, m]); returns G's shape and dtype.

    Leading dims are a batch: every [n, m] slice is normalised and iterated on its own, so a stack
    of same-shape matrices (e.g. the experts of one MoE layer, [E, I, D]) costs one batched GEMM
    chain. Tall slices (n > m) are transposed so `A = X·Xᵀ` is the small min(n, m)² Gram matrix.
    The Frobenius normalisation is done in float32 (it bounds the spectral norm by 1, which the
    iteration needs to converge) and the iterations in `dtype`. On a GPU the same iteration runs in
    `k2train.kernels.newton_schulz` (one-pass normalisation, preallocated batched GEMMs); the code
    below is its reference.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz expects a matrix or a stack of matrices, got shape {tuple(G.shape)}.")
    if len(coefficients) != 3:
        raise ValueError(f"newton_schulz expects 3 coefficients (a, b, c), got {coefficients}.")
    if use_triton(G):
        from k2train.kernels.newton_schulz import newton_schulz_fast

        return newton_schulz_fast(G, steps, tuple(coefficients), eps, dtype)
    return newton_schulz_eager(G, steps, coefficients, eps, dtype)


def newton_schulz_eager(G: Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                         dtype: torch.dtype) -> Tensor:
    """The reference of `newton_schulz`, in plain torch (any device)."""
    a, b, c = coefficients
    X = G.float().reshape(-1, G.size(-2), G.size(-1))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)).to(dtype)
    for _ in range(steps):
        A = X @ X.mT
        # baddbmm rounds each fused "beta·C + alpha·(P·Q)" once: half the bf16 error of separate ops.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def newton_schulz_many(
    matrices: list[Tensor],
    steps: int = 5,
    coefficients: tuple[float, float, float] = K2_NS_COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Tensor]:
    """`newton_schulz` of each tensor ([..., n, m]) in the list, one batched call per matrix shape.

    Tensors whose last two dims agree (the q/kv/o projections of all layers, the expert stacks of
    all MoE layers) are stacked into one [sum of batches, n, m] tensor, so the GEMMs are few and large.
    """
    by_shape: dict[tuple[int, int, torch.device], list[int]] = {}
    for index, matrix in enumerate(matrices):
        by_shape.setdefault((matrix.shape[-2], matrix.shape[-1], matrix.device), []).append(index)
    results: list[Tensor | None] = [None] * len(matrices)
    for (n, m, _), indices in by_shape.items():
        stacked = torch.cat([matrices[i].reshape(-1, n, m) for i in indices])
        orthogonal = newton_schulz(stacked, steps, coefficients, dtype=dtype)
        sizes = [matrices[i].numel() // (n * m) for i in indices]
        for i, part in zip(indices, orthogonal.split(sizes)):
            results[i] = part.reshape(matrices[i].shape)
    return results

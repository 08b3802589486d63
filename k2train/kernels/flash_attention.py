"""Causal flash attention (forward and backward) that also returns each head's max logit.

QK-Clip (K2 §2.1) needs S_max^h, the largest pre-softmax logit q·k·scale of head
h. FlashAttention does not expose it and its log-sum-exp is only an upper bound, while a separate
QKᵀ pass costs 2.6x the attention forward (docs/ARCHITECTURE.md#h200-limits). The forward kernel already holds the
exact running row max m_i of the fp32 scores for its online softmax, so it stores it per query row
(like the log-sum-exp: B·H·S floats) and a torch.amax afterwards gives the per-head max. No atomics.

Exactness: the kernel keeps m_i in raw q·k units and multiplies by the scale once at the end.
Rounding is monotone, so fl(max(q·k)·scale) = max(fl(q·k·scale)): the same value the eager
reference computes from the same fp32 dot products (up to their accumulation order).

Layout choices (FlashAttention-2):
- Forward: one program per (query block, batch·head); key blocks strictly below the diagonal need
  no mask, key blocks above it are never visited.
- Backward: two kernels with no atomics, hence deterministic. dkdv: one program per key block walks
  the query blocks at and after the diagonal. dq: one program per query block walks the key blocks up
  to the diagonal. Both recompute P = exp2(s·log2e - lse2) from the saved base-2 log-sum-exp;
  delta = rowsum(dO ∘ O) comes from a small preprocessing kernel.
- MLA's qk head dim 192 (= 128 nope + 64 rope) is not a power of two and Triton tiles must be: the
  qk dim is split into a power-of-two part A and a remainder part B padded to a power of two (192 =
  128 + 64, no padding; tiny configs, e.g. 24 = 16 + 16 with 8 masked columns), instead of one
  256-wide tile that would waste a quarter of the QKᵀ work.
- Sequence ends are masked on every load; the lse of a padded query row loads as +inf so its P is 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Fixed when the kernels below are decorated: triton.jit builds interpreter functions only if
# TRITON_INTERPRET=1 was set before this module was imported.
_INTERPRETED = bool(knobs.runtime.interpret)
_LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The interpreter keeps bfloat16 as its uint16 bits and its tl.dot multiplies those bits
# (triton-lang/triton#11584): there, bfloat16 dot operands are widened to fp32 first, which forms the
# same exact products that the tensor cores accumulate in fp32.
_WIDEN_BF16_DOTS = tl.constexpr(_INTERPRETED)


@triton.jit
def _load_tile(base, offs_r, stride_r, n_r, offs_c, n_c, PAD_C: tl.constexpr):
    """Rows offs_r (< n_r) x contiguous columns offs_c (< n_c when PAD_C) of a strided matrix; 0 outside."""
    mask = offs_r[:, None] < n_r
    if PAD_C:
        mask = mask & (offs_c[None, :] < n_c)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, val, offs_r, stride_r, n_r, offs_c, n_c, PAD_C: tl.constexpr):
    mask = offs_r[:, None] < n_r
    if PAD_C:
        mask = mask & (offs_c[None, :] < n_c)
    tl.store(base + offs_r[:, None] * stride_r + offs_c[None, :], val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_split(base, offs_r, stride_r, n_r, DK: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """A [rows, DK] tile as its two column blocks (a: the first BLOCK_DA, b: the next BLOCK_DB);
    without a second block, b is a (unused) alias of a."""
    a = _load_tile(base, offs_r, stride_r, n_r, tl.arange(0, BLOCK_DA), DK, BLOCK_DA > DK)
    b = a
    if BLOCK_DB > 0:
        b = _load_tile(base, offs_r, stride_r, n_r, BLOCK_DA + tl.arange(0, BLOCK_DB), DK, BLOCK_DA + BLOCK_DB > DK)
    return a, b


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _WIDEN_BF16_DOTS:
        if a.dtype == tl.bfloat16:
            a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _scores(q_a, q_b, k_a, k_b, HAS_B: tl.constexpr, PREC: tl.constexpr):
    """Raw fp32 q·kᵀ [M, N] from the two head-dim parts."""
    s = _dot(q_a, tl.trans(k_a), None, PREC)
    if HAS_B:
        s = _dot(q_b, tl.trans(k_b), s, PREC)
    return s


@triton.jit
def _fwd_step(q_a, q_b, m_i, l_i, acc, k_base, v_base, sks, svs, offs_m, start_n, S, qk_scale,
              DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr,
              BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax; m_i is the running row max of the raw scores."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_DA)
    k_a = _load_tile(k_base, offs_n, sks, S, offs_a, DK, BLOCK_DA > DK)
    k_b = k_a
    if BLOCK_DB > 0:
        offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
        k_b = _load_tile(k_base, offs_n, sks, S, offs_b, DK, BLOCK_DA + BLOCK_DB > DK)
    s = _scores(q_a, q_b, k_a, k_b, BLOCK_DB > 0, PREC)
    if CAUSAL_MASK:
        # Also hides keys past S from every real query row (key > row); padded rows are never stored.
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2((m_i - m_new) * qk_scale)
    p = tl.math.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    offs_v = tl.arange(0, BLOCK_DV)
    v = _load_tile(v_base, offs_n, svs, S, offs_v, DV, BLOCK_DV > DV)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE2, ROWMAX, sm_scale, qk_scale,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, H, S,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    # Longest rows first: block m visits m+1 key blocks' worth of work.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base, k_base = Q + b * sqb + h * sqh, K + b * skb + h * skh
    v_base, o_base = V + b * svb + h * svh, O + b * sob + h * soh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_split(q_base, offs_m, sqs, S, DK, BLOCK_DA, BLOCK_DB)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Keys before start_m are visible to every row of the block (BLOCK_M is a multiple of BLOCK_N).
    for start_n in range(0, start_m, BLOCK_N):
        m_i, l_i, acc = _fwd_step(q_a, q_b, m_i, l_i, acc, k_base, v_base, sks, svs, offs_m, start_n, S,
                                  qk_scale, DK, DV, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, False, PREC)
    # The diagonal: every row sees key start_m, so m_i is finite after the first step.
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        m_i, l_i, acc = _fwd_step(q_a, q_b, m_i, l_i, acc, k_base, v_base, sks, svs, offs_m, start_n, S,
                                  qk_scale, DK, DV, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, True, PREC)
    _store_tile(o_base, acc / l_i[:, None], offs_m, sos, S, tl.arange(0, BLOCK_DV), DV, BLOCK_DV > DV)
    row_mask = offs_m < S
    tl.store(LSE2 + bh * S + offs_m, m_i * qk_scale + tl.math.log2(l_i), mask=row_mask)
    tl.store(ROWMAX + bh * S + offs_m, m_i * sm_scale, mask=row_mask)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, H, S,
                  DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO ∘ O) in fp32: the softmax backward's per-row correction term."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_DV)
    o = _load_tile(O + b * sob + h * soh, offs_m, sos, S, offs_v, DV, BLOCK_DV > DV).to(tl.float32)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, sds, S, offs_v, DV, BLOCK_DV > DV).to(tl.float32)
    tl.store(DELTA + bh * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _dkdv_step(k_a, k_b, v, dk_a, dk_b, dv, q_base, do_base, LSE2_bh, DELTA_bh, sqs, sds, offs_n, start_m, S,
               qk_scale, DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DA: tl.constexpr,
               BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    """One query block's contribution to a key block's dk, dv; tiles are transposed ([keys, queries])."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_split(q_base, offs_m, sqs, S, DK, BLOCK_DA, BLOCK_DB)
    do = _load_tile(do_base, offs_m, sds, S, tl.arange(0, BLOCK_DV), DV, BLOCK_DV > DV)
    lse2 = tl.load(LSE2_bh + offs_m, mask=offs_m < S, other=float("inf"))
    delta = tl.load(DELTA_bh + offs_m, mask=offs_m < S, other=0.0)
    p_T = tl.math.exp2(_scores(k_a, k_b, q_a, q_b, BLOCK_DB > 0, PREC) * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        p_T = tl.where(offs_m[None, :] >= offs_n[:, None], p_T, 0.0)
    dv = _dot(p_T.to(do.dtype), do, dv, PREC)
    dp_T = _dot(v, tl.trans(do), None, PREC)
    ds_T = (p_T * (dp_T - delta[None, :])).to(q_a.dtype)
    dk_a = _dot(ds_T, q_a, dk_a, PREC)
    if BLOCK_DB > 0:
        dk_b = _dot(ds_T, q_b, dk_b, PREC)
    return dk_a, dk_b, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK_, DV_, sm_scale, qk_scale,
                 sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                 sgkb, sgkh, sgks, sgvb, sgvh, sgvs, H, S,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base, k_base, v_base = Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh
    do_base = DO + b * sdb + h * sdh
    lse2_bh, delta_bh = LSE2 + bh * S, DELTA + bh * S
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_a, offs_v = tl.arange(0, BLOCK_DA), tl.arange(0, BLOCK_DV)
    k_a = _load_tile(k_base, offs_n, sks, S, offs_a, DK, BLOCK_DA > DK)
    dk_a = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    k_b, dk_b = k_a, dk_a
    if BLOCK_DB > 0:
        offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
        k_b = _load_tile(k_base, offs_n, sks, S, offs_b, DK, BLOCK_DA + BLOCK_DB > DK)
        dk_b = tl.zeros([BLOCK_N, BLOCK_DB], dtype=tl.float32)
    v = _load_tile(v_base, offs_n, svs, S, offs_v, DV, BLOCK_DV > DV)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Queries in the key block's own span need the causal mask (BLOCK_N is a multiple of BLOCK_M);
    # every later query sees all of its keys; earlier queries see none and are skipped.
    for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, S), BLOCK_M):
        dk_a, dk_b, dv = _dkdv_step(k_a, k_b, v, dk_a, dk_b, dv, q_base, do_base, lse2_bh, delta_bh, sqs, sds,
                                    offs_n, start_m, S, qk_scale, DK, DV, BLOCK_M, BLOCK_DA, BLOCK_DB,
                                    BLOCK_DV, True, PREC)
    for start_m in range(start_n + BLOCK_N, S, BLOCK_M):
        dk_a, dk_b, dv = _dkdv_step(k_a, k_b, v, dk_a, dk_b, dv, q_base, do_base, lse2_bh, delta_bh, sqs, sds,
                                    offs_n, start_m, S, qk_scale, DK, DV, BLOCK_M, BLOCK_DA, BLOCK_DB,
                                    BLOCK_DV, False, PREC)
    dk_base = DK_ + b * sgkb + h * sgkh
    _store_tile(dk_base, dk_a * sm_scale, offs_n, sgks, S, offs_a, DK, BLOCK_DA > DK)
    if BLOCK_DB > 0:
        _store_tile(dk_base, dk_b * sm_scale, offs_n, sgks, S, offs_b, DK, BLOCK_DA + BLOCK_DB > DK)
    _store_tile(DV_ + b * sgvb + h * sgvh, dv, offs_n, sgvs, S, offs_v, DV, BLOCK_DV > DV)


@triton.jit
def _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, k_base, v_base, sks, svs, offs_m, start_n, S, qk_scale,
             DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr,
             BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    """One key block's contribution to a query block's dq."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_split(k_base, offs_n, sks, S, DK, BLOCK_DA, BLOCK_DB)
    v = _load_tile(v_base, offs_n, svs, S, tl.arange(0, BLOCK_DV), DV, BLOCK_DV > DV)
    p = tl.math.exp2(_scores(q_a, q_b, k_a, k_b, BLOCK_DB > 0, PREC) * qk_scale - lse2[:, None])
    if CAUSAL_MASK:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), None, PREC)
    ds = (p * (dp - delta[:, None])).to(k_a.dtype)
    dq_a = _dot(ds, k_a, dq_a, PREC)
    if BLOCK_DB > 0:
        dq_b = _dot(ds, k_b, dq_b, PREC)
    return dq_a, dq_b


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, sm_scale, qk_scale,
               sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sgqb, sgqh, sgqs, H, S,
               DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base, k_base, v_base = Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_DA)
    q_a = _load_tile(q_base, offs_m, sqs, S, offs_a, DK, BLOCK_DA > DK)
    dq_a = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    q_b, dq_b = q_a, dq_a
    if BLOCK_DB > 0:
        offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
        q_b = _load_tile(q_base, offs_m, sqs, S, offs_b, DK, BLOCK_DA + BLOCK_DB > DK)
        dq_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, sds, S, tl.arange(0, BLOCK_DV), DV, BLOCK_DV > DV)
    lse2 = tl.load(LSE2 + bh * S + offs_m, mask=offs_m < S, other=float("inf"))
    delta = tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
    for start_n in range(0, start_m, BLOCK_N):
        dq_a, dq_b = _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, k_base, v_base, sks, svs, offs_m, start_n,
                              S, qk_scale, DK, DV, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, False, PREC)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        dq_a, dq_b = _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, k_base, v_base, sks, svs, offs_m, start_n,
                              S, qk_scale, DK, DV, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, True, PREC)
    dq_base = DQ + b * sgqb + h * sgqh
    _store_tile(dq_base, dq_a * sm_scale, offs_m, sgqs, S, offs_a, DK, BLOCK_DA > DK)
    if BLOCK_DB > 0:
        _store_tile(dq_base, dq_b * sm_scale, offs_m, sgqs, S, offs_b, DK, BLOCK_DA + BLOCK_DB > DK)


def _configs(blocks_warps_stages: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in blocks_warps_stages]


# Candidate tiles for H100/H200 at MLA's 192/128 head dims in bf16/fp16, timed once per (S, DK, DV,
# dtype) by the autotuner. Each compiles for sm_90 within shared memory and without register spills.
# Forward and dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0 (the diagonal split).
_KEY = ["S", "DK", "DV"]
_fwd_tuned = triton.autotune(_configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)]),
                             key=_KEY)(_fwd_kernel)
_dkdv_tuned = triton.autotune(_configs([(32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2)]),
                              key=_KEY)(_dkdv_kernel)
_dq_tuned = triton.autotune(_configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)]),
                            key=_KEY)(_dq_kernel)
# The CPU interpreter runs tiles as numpy arrays: small ones keep the tests fast. fp32 dots must be
# IEEE for an exact max logit, which tensor cores do not do; Triton builds them from FMAs, and at
# larger tiles they spill and take minutes to compile. fp32 is the exact path; K2 trains in bf16.
_SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
_FP32_LAUNCH = {"num_warps": 4, "num_stages": 1}


def _launch(kernel, tuned, fp32: bool, grid_rows: int, BH: int, *args, **constexprs) -> None:
    """Runs `kernel` over (row blocks, batch·head): autotuned tiles on a GPU in 16-bit, else small ones."""
    if _INTERPRETED or fp32:
        launch = {} if _INTERPRETED else _FP32_LAUNCH
        grid = (triton.cdiv(grid_rows, _SMALL_TILES["BLOCK_M"]), BH)
        kernel[grid](*args, **constexprs, **_SMALL_TILES, **launch)
    else:
        tuned[lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]), BH)](*args, **constexprs)


def _head_dim_blocks(DK: int, DV: int) -> dict:
    """Splits the qk head dim into a power-of-two part A and a padded remainder B (0: none).

    tl.dot needs every tile dim to be a power of two and at least 16.
    """
    if DK <= 16:
        block_a, block_b = 16, 0
    else:
        block_a = 1 << (DK.bit_length() - 1)
        rest = DK - block_a
        block_b = max(16, triton.next_power_of_2(rest)) if rest else 0
    return {"DK": DK, "DV": DV, "BLOCK_DA": block_a, "BLOCK_DB": block_b,
            "BLOCK_DV": max(16, triton.next_power_of_2(DV))}


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim as contiguous; other dims may have any stride (MLA's views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32 on the tensor cores: the max logit would no longer be
    # the fp32 one. For 16-bit inputs the setting is moot.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out_BHSV, the base-2 log-sum-exp [B·H, S] and max_logit_H."""
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    out = torch.empty((B, H, S, DV), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B * H, S), dtype=torch.float32, device=q.device)
    rowmax = torch.empty((B * H, S), dtype=torch.float32, device=q.device)
    _launch(_fwd_kernel, _fwd_tuned, q.dtype == torch.float32, S, B * H,
            q, k, v, out, lse2, rowmax, scale, scale * _LOG2E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, S,
            **_head_dim_blocks(DK, DV), PREC=_precision(q.dtype))
    return out, lse2, rowmax.view(B, H, S).amax(dim=(0, 2))


def _backward(q, k, v, out, lse2, dout, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    dims = {**_head_dim_blocks(DK, DV), "PREC": _precision(q.dtype)}
    delta = torch.empty((B * H, S), dtype=torch.float32, device=q.device)
    delta_rows = _SMALL_TILES["BLOCK_M"] if _INTERPRETED else 64
    _delta_kernel[(triton.cdiv(S, delta_rows), B * H)](
        out, dout, delta, *_strides(out), *_strides(dout), H, S,
        DV=DV, BLOCK_M=delta_rows, BLOCK_DV=dims["BLOCK_DV"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    inputs = (q, k, v, dout, lse2, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    fp32 = q.dtype == torch.float32
    _launch(_dkdv_kernel, _dkdv_tuned, fp32, S, B * H, *inputs, dk, dv, scale, scale * _LOG2E,
            *strides, *_strides(dk), *_strides(dv), H, S, **dims)
    _launch(_dq_kernel, _dq_tuned, fp32, S, B * H, *inputs, dq, scale, scale * _LOG2E,
            *strides, *_strides(dq), H, S, **dims)
    return dq, dk, dv


class _FlashAttentionWithMaxLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse2, max_logit_H = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.scale = scale
        ctx.mark_non_differentiable(max_logit_H)
        return out, max_logit_H

    @staticmethod
    def backward(ctx, dout, _dmax_logit):
        q, k, v, out, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse2, _unit_last(dout), ctx.scale)
        return dq, dk, dv, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"flash_attention_with_max_logits expects q [B, H, S, K], k of q's shape and v "
                         f"[B, H, S, V]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention_with_max_logits expects q, k, v of one dtype among bfloat16, "
                         f"float16, float32; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device) or not (q.is_cuda or _INTERPRETED):
        raise ValueError(f"flash_attention_with_max_logits runs on one CUDA device (on CPU only when "
                         f"TRITON_INTERPRET=1 was set before importing it); got q on {q.device}, k on "
                         f"{k.device}, v on {v.device}.")


def flash_attention_with_max_logits(
    q_BHSK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSV: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention; returns (out_BHSV, max_logit_H float32, detached).

    The same contract as k2train.model.attention.eager_causal_attention_with_max_logits; q and k may
    have a different head dim from v, and any strides (the head dim is made contiguous if it is not).
    """
    _check_inputs(q_BHSK, k_BHSK, v_BHSV)
    q, k, v = (_unit_last(t) for t in (q_BHSK, k_BHSK, v_BHSV))
    return _FlashAttentionWithMaxLogits.apply(q, k, v, float(scale))

"""Causal flash attention (forward and backward) that also returns each head's max logit.

QK-Clip (K2 §2.1) needs S_max^h, the largest pre-softmax logit q·k·scale of head
h. FlashAttention does not expose it and its log-sum-exp is only an upper bound, while a separate
QKᵀ pass costs 2.6x the attention forward (docs/ARCHITECTURE.md#h200-limits). The forward kernel already holds the
exact running row max m_i of the fp32 scores for its online softmax, so it stores it per query row
(like the log-sum-exp: B·H·S floats) and a torch.amax afterwards gives the per-head max. No atomics.

Exactness: the kernel keeps m_i in raw q·k units and multiplies by the scale once at the end.
Rounding is monotone, so fl(max(q·k)·scale) = max(fl(q·k·scale)): the same value the eager
reference computes from the same fp32 dot products (up to their accumulation order).

The Triton kernels themselves are in flash_attention_kernels.py.
"""

from __future__ import annotations

import torch
import triton

from k2train.kernels.flash_attention_kernels import INTERPRETED, LOG2E, delta_kernel, dkdv_kernel, dq_kernel, fwd_kernel

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _configs(blocks_warps_stages: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in blocks_warps_stages]


# Candidate tiles for H100/H200 at MLA's 192/128 head dims in bf16/fp16, timed once per (S, DK, DV,
# dtype) by the autotuner. Each compiles for sm_90 within shared memory and without register spills.
# Forward and dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0 (the diagonal split).
_KEY = ["S", "DK", "DV"]
_fwd_tuned = triton.autotune(_configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)]),
                             key=_KEY)(fwd_kernel)
_dkdv_tuned = triton.autotune(_configs([(32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2)]),
                              key=_KEY)(dkdv_kernel)
_dq_tuned = triton.autotune(_configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)]),
                            key=_KEY)(dq_kernel)
# The CPU interpreter runs tiles as numpy arrays: small ones keep the tests fast. fp32 dots must be
# IEEE for an exact max logit, which tensor cores do not do; Triton builds them from FMAs, and at
# larger tiles they spill and take minutes to compile. fp32 is the exact path; K2 trains in bf16.
_SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
_FP32_LAUNCH = {"num_warps": 4, "num_stages": 1}


def _launch(kernel, tuned, fp32: bool, grid_rows: int, BH: int, *args, **constexprs) -> None:
    """Runs `kernel` over (row blocks, batch·head): autotuned tiles on a GPU in 16-bit, else small ones."""
    if INTERPRETED or fp32:
        launch = {} if INTERPRETED else _FP32_LAUNCH
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
    _launch(fwd_kernel, _fwd_tuned, q.dtype == torch.float32, S, B * H,
            q, k, v, out, lse2, rowmax, scale, scale * LOG2E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, S,
            **_head_dim_blocks(DK, DV), PREC=_precision(q.dtype))
    return out, lse2, rowmax.view(B, H, S).amax(dim=(0, 2))


def _backward(q, k, v, out, lse2, dout, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    dims = {**_head_dim_blocks(DK, DV), "PREC": _precision(q.dtype)}
    delta = torch.empty((B * H, S), dtype=torch.float32, device=q.device)
    delta_rows = _SMALL_TILES["BLOCK_M"] if INTERPRETED else 64
    delta_kernel[(triton.cdiv(S, delta_rows), B * H)](
        out, dout, delta, *_strides(out), *_strides(dout), H, S,
        DV=DV, BLOCK_M=delta_rows, BLOCK_DV=dims["BLOCK_DV"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    inputs = (q, k, v, dout, lse2, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    fp32 = q.dtype == torch.float32
    _launch(dkdv_kernel, _dkdv_tuned, fp32, S, B * H, *inputs, dk, dv, scale, scale * LOG2E,
            *strides, *_strides(dk), *_strides(dv), H, S, **dims)
    _launch(dq_kernel, _dq_tuned, fp32, S, B * H, *inputs, dq, scale, scale * LOG2E,
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
    if not (q.device == k.device == v.device) or not (q.is_cuda or INTERPRETED):
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

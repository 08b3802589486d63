"""SwiGLU + down-projection recomputed from FP8 inputs: both memory features at once (K2 §2.4.3).

With selective recomputation alone, SwiGLU and the down-projection keep only their inputs, gate and
up, in the compute dtype; with FP8 storage alone, SwiGLU keeps gate and up as FP8 tiles but the
down-projection keeps its input, the SwiGLU output. K2 does both: the inputs of SwiGLU wait for
backward as FP8 tiles, and SwiGLU with the down-projection runs again from them in backward. That
is this function: it saves FP8(gate), FP8(up) and the weight, nothing else.

With `scale` (the routed experts' combine weights, one per row) the output rows are multiplied by
it here, so that the down-projection's output is not saved by that multiplication either: K2
recomputes the MoE down-projections (§2.4.3). Backward then runs the down-projection again, once,
for the gradient of the scale.

Forward is the plain computation bit for bit. Backward rebuilds hidden = silu(gate)·up from the
dequantised inputs (float32 math, rounded once to the compute dtype) for the down-projection's
weight gradient, and differentiates SwiGLU at the dequantised inputs, exactly as the FP8-stored
SwiGLU does; grad of hidden uses the exact weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from k2train.kernels.fp8_format import TILE
from k2train.memory.fp8 import quantize_tiles, swiglu_grads, unpack_saved
from k2train.memory.weight_grads import grouped_project, grouped_weight_grad


class _Fp8RecomputedSwiGLUDown(torch.autograd.Function):
    """out = down(silu(gate)·up) [· scale], down = F.linear (offs None) or torch._grouped_mm (offs given)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor | None,
                scale: torch.Tensor | None, tile: int) -> torch.Tensor:
        hidden = F.silu(gate) * up
        out = project(hidden, w_down, offs)
        if any(ctx.needs_input_grad[:5]):
            g, u = quantize_tiles(gate, tile), quantize_tiles(up, tile)
            ctx.save_for_backward(g.data, g.scales, u.data, u.scales, w_down, offs, scale)
        ctx.dtypes, ctx.tile, ctx.grouped = (gate.dtype, up.dtype), tile, offs is not None
        return out if scale is None else out * scale

    @staticmethod
    @once_differentiable  # the backward uses dequantised copies: no double backward
    def backward(ctx, grad_out: torch.Tensor):
        g_data, g_scales, u_data, u_scales, w_down, offs, scale = ctx.saved_tensors
        gate = unpack_saved(g_data, g_scales, torch.float32, ctx.tile)
        up = unpack_saved(u_data, u_scales, torch.float32, ctx.tile)
        hidden = (F.silu(gate) * up).to(ctx.dtypes[0])  # the down-projection's input, recomputed
        grad_scale = None
        if scale is not None:
            # As the multiplication's own backward forms them: the product, then the sum over its row.
            if ctx.needs_input_grad[4]:
                grad_scale = (grad_out * project(hidden, w_down, offs)).sum(dim=-1, keepdim=True)
            grad_out = grad_out * scale
        grad_w = None
        if ctx.grouped:
            grad_out = grad_out.contiguous()  # _grouped_mm needs 16-byte aligned strides
            grad_h = torch._grouped_mm(grad_out, w_down.transpose(-2, -1), offs=offs)
            if ctx.needs_input_grad[2]:  # now, or deferred under the dispatch's exchange (weight_grads.py)
                grad_w = grouped_weight_grad(ctx, 2, lambda: hidden, grad_out, w_down, offs)
        else:
            grad_h = grad_out.matmul(w_down)
            if ctx.needs_input_grad[2]:
                grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(hidden.reshape(-1, hidden.shape[-1]))
        grad_gate, grad_up = swiglu_grads(grad_h, gate, up, ctx.dtypes)
        return grad_gate, grad_up, grad_w, None, grad_scale, None


def project(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None, deferrable: bool = False) -> torch.Tensor:
    """x times a weight: F.linear (offs None, w an nn.Linear weight) or torch._grouped_mm (offs the
    int32 cumulative rows per expert, w [E, in, out]; with `deferrable`, its weight gradient may
    wait, weight_grads.py)."""
    if offs is None:
        return F.linear(x, w)
    return grouped_project(x, w, offs) if deferrable else torch._grouped_mm(x, w, offs=offs)


def fp8_recomputed_swiglu_down(gate: torch.Tensor, up: torch.Tensor, w_down: torch.Tensor,
                               offs: torch.Tensor | None = None, tile: int = TILE,
                               scale: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate)·up) [· scale], saving only FP8 tiles of gate and up (the weight, and the
    scale) for backward.

    Dense: gate, up [..., I], w_down [D, I] (an nn.Linear weight) -> [..., D]. Grouped (routed
    experts): gate, up [N, I] sorted by expert, w_down [E, I, D] (the transposed view of a
    [E, D, I] stack), offs int32 cumulative rows -> [N, D]. scale: [N, 1] in the compute dtype.
    """
    return _Fp8RecomputedSwiGLUDown.apply(gate, up, w_down, offs, scale, tile)

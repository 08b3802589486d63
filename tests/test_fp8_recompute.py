"""SwiGLU + down-projection recomputed from FP8 gate and up (memory.fp8_activations together with
memory.selective_recompute): the forward is exact, the backward is the plain backward taken at the
dequantised inputs, and only the FP8 tiles are saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2train.memory import saved_bytes
from k2train.memory.fp8 import dequantize_tiles, quantize_tiles
from k2train.memory.fp8_recompute import fp8_recomputed_swiglu_down


def _inputs(rows: int, width: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, width, generator=g, requires_grad=True)
    up = torch.randn(rows, width, generator=g, requires_grad=True)
    return gate, up, g


def _round_trip(x: torch.Tensor) -> torch.Tensor:
    return dequantize_tiles(quantize_tiles(x.detach()), torch.float32).requires_grad_()


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
def test_forward_exact_backward_is_plain_backward_at_dequantised_inputs(grouped, scaled):
    rows, width, dim = 40, 200, 48  # width not a multiple of the 128-wide tile
    gate, up, g = _inputs(rows, width, dim)
    # The routed experts' combine weights, one per row (scaled inside: the down output is not saved).
    scale = torch.rand(rows, 1, generator=g, requires_grad=True) if scaled else None
    times = (lambda y, s: y * s) if scaled else (lambda y, s: y)  # noqa: E731
    grad_out = torch.randn(rows, dim, generator=g)
    if grouped:
        offs = torch.tensor([7, 7, 31, 40], dtype=torch.int32)  # an empty group, uneven sizes
        w = torch.randn(4, dim, width, generator=g).transpose(-2, -1).requires_grad_()  # [E, I, D] view
        down = lambda h, weight: torch._grouped_mm(h, weight, offs=offs)  # noqa: E731
    else:
        offs = None
        w = torch.randn(dim, width, generator=g, requires_grad=True)
        down = F.linear
    out = fp8_recomputed_swiglu_down(gate, up, w, offs, scale=scale)
    assert torch.equal(out, times(down(F.silu(gate) * up, w), scale))
    out.backward(grad_out)
    got = (gate.grad, up.grad, w.grad, *((scale.grad,) if scaled else ()))

    gate_q, up_q = _round_trip(gate), _round_trip(up)
    w_ref = w.detach().clone().requires_grad_()
    scale_ref = scale.detach().clone().requires_grad_() if scaled else None
    times(down(F.silu(gate_q) * up_q, w_ref), scale_ref).backward(grad_out)
    want = (gate_q.grad, up_q.grad, w_ref.grad, *((scale_ref.grad,) if scaled else ()))
    for name, a, b in zip(("gate", "up", "down", "scale"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_only_the_fp8_tiles_are_saved():
    rows, width, dim = 64, 256, 32
    gate, up, g = _inputs(rows, width, dim, seed=1)
    w = torch.randn(dim, width, generator=g, requires_grad=True)
    got = saved_bytes(fp8_recomputed_swiglu_down, gate, up, w, exclude=(w,))
    assert got == 2 * (rows * width + 4 * rows * (width // 128))  # FP8 data + one FP32 scale per tile
    plain = saved_bytes(lambda a, b: F.linear(F.silu(a) * b, w), gate, up, exclude=(w,))
    assert got < 0.4 * plain
    # With the combine weights applied inside, they are saved too, and the down output still is not.
    scale = torch.rand(rows, 1, generator=g, requires_grad=True)
    scaled = saved_bytes(lambda a, b, s: fp8_recomputed_swiglu_down(a, b, w, scale=s), gate, up, scale, exclude=(w,))
    assert scaled == got + 4 * rows

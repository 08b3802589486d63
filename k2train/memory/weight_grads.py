"""The routed experts' projections, whose weight gradients can wait (K2 §2.4).

A MoE layer's backward ends with the dispatch's all-to-all: the routed experts' input gradients
have to reach their tokens' ranks before the attention below can run its backward. Their weight
gradients are needed by nobody until the optimizer step. So while communication overlap pairs a
backward with a forward (parallel/pipeline/overlap.py), the backward computes the experts' input
gradients first, puts the dispatch's exchange on the wire, and only then computes the experts'
weight gradients: that exchange is in flight under them and under the paired forward's next
segment, instead of under the forward's segment alone, which is the shorter one (a forward's
attention and router against a backward's exchange). This is the input/weight-gradient split
that DualPipe and zero-bubble schedules use, applied inside one MoE layer.

`grouped_project` is torch._grouped_mm with its own backward: the input gradient at once, the
weight gradient at once too unless this thread is inside `deferring_weight_grads`, where it is
queued until `run_deferred_weight_grads` (the exchange's issue) or the end of the scope. A queued
gradient reaches the weight through autograd (`torch.autograd.backward` on the weight's gradient
edge), so the parameter's accumulation and its hooks run as they would have: the same values, one
layer later in time. Each gradient is formed as torch's own _grouped_mm backward forms it, so the
values equal autograd's bit for bit. Only the gradients the running backward asks for are computed
(a zero-bubble input-gradient pass needs no weight gradient; its weight pass no input gradient).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd.graph import GradientEdge

_local = threading.local()


def _queue() -> list[Callable[[], None]] | None:
    return getattr(_local, "queue", None)


@contextmanager
def deferring_weight_grads() -> Iterator[None]:
    """In this thread, the routed experts' weight gradients wait for `run_deferred_weight_grads`;
    any still waiting at the end of the scope are computed there."""
    if _queue() is not None:
        raise RuntimeError("deferring_weight_grads: this thread is already deferring its weight gradients.")
    _local.queue = []
    try:
        yield
        run_deferred_weight_grads()
    finally:
        _local.queue = None


def run_deferred_weight_grads() -> int:
    """Compute and accumulate the weight gradients this thread has deferred, in the order queued
    (nothing outside `deferring_weight_grads`); returns how many."""
    queue = _queue()
    done = 0
    while queue:
        queue.pop(0)()
        done += 1
    return done


def _will_run(edge: tuple) -> bool:
    """Whether the running backward needs the gradient for this input edge of the node."""
    node = edge[0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf under torch.autograd.grad, which torch cannot answer for: compute it
        return True


def weight_grad(x_ND: torch.Tensor, grad_NO: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """d(x @ w[e] per group)/dw, in the weight's own memory order, as torch's _grouped_mm backward forms it."""
    if w.stride(-2) > w.stride(-1):
        return torch._grouped_mm(x_ND.t(), grad_NO, offs=offs)
    return torch._grouped_mm(grad_NO.t(), x_ND, offs=offs).transpose(-2, -1)


class _GroupedProject(torch.autograd.Function):
    """x [N, in] rows sorted by group, w [E, in, out], offs int32 cumulative rows -> [N, out]."""

    @staticmethod
    def forward(ctx, x_ND, w, offs):
        ctx.save_for_backward(x_ND, w, offs)
        return torch._grouped_mm(x_ND, w, offs=offs)

    @staticmethod
    def backward(ctx, grad_NO):
        x_ND, w, offs = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad_NO, w.transpose(-2, -1), offs=offs) if _will_run(ctx.next_functions[0]) else None
        grad_w = None
        if _will_run(ctx.next_functions[1]):
            queue = _queue()
            if queue is None:
                grad_w = weight_grad(x_ND, grad_NO, w, offs)
            else:
                edge = GradientEdge(*ctx.next_functions[1])
                queue.append(lambda: torch.autograd.backward([edge], [weight_grad(x_ND, grad_NO, w, offs)]))
        return grad_x, grad_w, None


def grouped_project(x_ND: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x_ND, w, offs=offs), whose weight gradient may be deferred (module docstring)."""
    if not torch.is_grad_enabled():
        return torch._grouped_mm(x_ND, w, offs=offs)
    return _GroupedProject.apply(x_ND, w, offs)

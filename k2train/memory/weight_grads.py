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

`grouped_project` is torch._grouped_mm with its own backward (the experts use it where the overlap
runtime set `SavePolicy.deferrable_wgrad`; elsewhere torch's own op, whose backward torch's
zero-bubble weight pass handles on every supported torch): the input gradient at once, the
weight gradient at once too unless inside `deferring_weight_grads`, where it is queued until
`run_deferred_weight_grads` (an exchange's issue, which may leave the last-queued ones for the
next exchange) or the end of the scope (a scope given a `carried` list leaves them in it, for the
next scope or `run_weight_grads`: the overlap runtime carries them to the next backward). The experts' FP8
variants (fp8.py `fp8_saved_grouped_mm`, fp8_recompute.py's down-projection) form their weight
gradients through `grouped_weight_grad` too, so K2's configuration defers them as well. A queued
gradient reaches the weight through autograd (`torch.autograd.backward` on the weight's gradient
edge), so the parameter's accumulation and its hooks run as they would have: the same values, a
little later in time. Each gradient is formed as torch's own _grouped_mm backward forms it, so the
values equal autograd's bit for bit. Only the gradients the running backward asks for are computed
(a zero-bubble input-gradient pass needs no weight gradient; its weight pass no input gradient).

The scope is the process's, not a thread's: on a GPU the autograd engine runs a backward's nodes
on its device thread, not in the thread that started the backward. One backward at a time runs
in it (a pair holds one backward; its forward computes no gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd.graph import GradientEdge

# The weight gradients waiting in the open scope, oldest first; None outside `deferring_weight_grads`.
_waiting: list[Callable[[], None]] | None = None


@contextmanager
def deferring_weight_grads(carried: list[Callable[[], None]] | None = None) -> Iterator[None]:
    """While open, the routed experts' weight gradients wait for `run_deferred_weight_grads`.
    Without `carried`, any still waiting at the end of the scope are computed there. With it (a
    list the caller keeps), the scope's queue is that list: it starts with what an earlier scope
    left, and what is still waiting at the end stays in it, for the next scope or `run_weight_grads`."""
    global _waiting
    if _waiting is not None:
        raise RuntimeError("deferring_weight_grads: weight gradients are already being deferred; "
                           "one backward at a time may defer them.")
    _waiting = [] if carried is None else carried
    try:
        yield
        if carried is None:
            run_deferred_weight_grads()
    finally:
        _waiting = None


def run_weight_grads(waiting: list[Callable[[], None]], keep: int = 0) -> int:
    """Compute and accumulate the weight gradients of `waiting`, oldest first, but for the `keep`
    queued last; returns how many it computed."""
    done = 0
    while len(waiting) > keep:
        waiting.pop(0)()
        done += 1
    return done


def run_deferred_weight_grads(keep: int = 0) -> int:
    """Compute and accumulate the weight gradients deferred so far, in the order queued, but for the
    `keep` queued last (none outside `deferring_weight_grads`); returns how many it computed."""
    return 0 if _waiting is None else run_weight_grads(_waiting, keep)


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
    """d(x @ w[e] per group)/dw, in the weight's own memory order, as torch's _grouped_mm backward
    forms it (the same GEMMs, so the same bits on the same inputs)."""
    if w.stride(-2) > w.stride(-1):
        return torch._grouped_mm(x_ND.t(), grad_NO, offs=offs)
    return torch._grouped_mm(grad_NO.t(), x_ND, offs=offs).transpose(-2, -1)


def grouped_weight_grad(ctx, index: int, x_of: Callable[[], torch.Tensor], grad_NO: torch.Tensor,
                        w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """For the backward of a grouped-experts autograd Function (`ctx`) whose input `index` is the
    weight w of a projection x @ w[e] (x = `x_of()`, e.g. dequantised from what was saved): the
    weight's gradient to return, or None where the running backward does not need it or, inside
    `deferring_weight_grads`, where it is queued to reach the weight through autograd later."""
    edge = ctx.next_functions[index]
    if not _will_run(edge):
        return None
    if _waiting is None:
        return weight_grad(x_of(), grad_NO, w, offs)
    _waiting.append(lambda: torch.autograd.backward([GradientEdge(*edge)], [weight_grad(x_of(), grad_NO, w, offs)]))
    return None


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
        return grad_x, grouped_weight_grad(ctx, 1, lambda: x_ND, grad_NO, w, offs), None


def grouped_project(x_ND: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x_ND, w, offs=offs), whose weight gradient may be deferred (module docstring)."""
    if not torch.is_grad_enabled():
        return torch._grouped_mm(x_ND, w, offs=offs)
    return _GroupedProject.apply(x_ND, w, offs)

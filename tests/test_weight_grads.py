"""The routed experts' projection whose weight gradient can wait (k2train/memory/weight_grads.py)."""

import pytest
import torch

from k2train.memory.fp8 import fp8_saved_grouped_mm
from k2train.memory.fp8_recompute import fp8_recomputed_swiglu_down
from k2train.memory.weight_grads import deferring_weight_grads, grouped_project, run_deferred_weight_grads

COUNTS = [3, 0, 5, 8]  # rows per expert, one expert with none


def _problem(dtype: torch.dtype, transposed: bool):
    """x [N, 16] sorted by expert, a weight [E, 16, 8] (a transposed view of an [E, 8, 16] stack, as
    the experts pass theirs, or a plain one), offs, and an upstream gradient."""
    gen = torch.Generator().manual_seed(0)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    x = torch.randn(sum(COUNTS), 16, generator=gen).to(dtype).requires_grad_()
    shape = (len(COUNTS), 8, 16) if transposed else (len(COUNTS), 16, 8)
    stack = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(sum(COUNTS), 8, generator=gen).to(dtype)
    return x, stack, offs, grad


def _weight(stack: torch.Tensor, transposed: bool) -> torch.Tensor:
    return stack.transpose(-2, -1) if transposed else stack


def _hooked(stack: torch.Tensor) -> list[torch.Tensor | None]:
    """What the parameter's post-accumulate hook sees each time it runs (ZeRO-1's hook reads .grad)."""
    seen: list[torch.Tensor | None] = []
    stack.register_post_accumulate_grad_hook(lambda p: seen.append(None if p.grad is None else p.grad.clone()))
    return seen


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed-weight", "plain-weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_torch_grouped_mm_bit_for_bit(dtype, transposed):
    x, stack, offs, grad = _problem(dtype, transposed)
    torch._grouped_mm(x, _weight(stack, transposed), offs=offs).backward(grad)
    want_x, want_w = x.grad, stack.grad
    x.grad = stack.grad = None
    out = grouped_project(x, _weight(stack, transposed), offs)
    assert torch.equal(out, torch._grouped_mm(x, _weight(stack, transposed), offs=offs))
    out.backward(grad)
    assert torch.equal(x.grad, want_x)
    assert torch.equal(stack.grad, want_w)


def test_a_deferred_weight_gradient_arrives_through_autograd_when_run():
    x, stack, offs, grad = _problem(torch.float32, True)
    torch._grouped_mm(x, _weight(stack, True), offs=offs).backward(grad)
    want_x, want_w = x.grad, stack.grad
    x.grad = stack.grad = None
    seen = _hooked(stack)
    with deferring_weight_grads():
        grouped_project(x, _weight(stack, True), offs).backward(grad)
        # The input gradient is there at once; the weight's accumulation ran with nothing to add.
        assert torch.equal(x.grad, want_x)
        assert stack.grad is None and seen == [None]
        assert run_deferred_weight_grads() == 1
        assert torch.equal(stack.grad, want_w)
        assert len(seen) == 2 and torch.equal(seen[1], want_w)
        assert run_deferred_weight_grads() == 0


def test_a_run_can_keep_the_gradients_queued_last():
    # An exchange may leave the last-queued weight gradients to the backward's next exchange.
    x, stack, offs, grad = _problem(torch.float32, True)
    other = torch.randn_like(stack).requires_grad_()
    with deferring_weight_grads():
        grouped_project(x, _weight(stack, True), offs).backward(grad)
        grouped_project(x, _weight(other, True), offs).backward(grad)
        assert run_deferred_weight_grads(keep=1) == 1
        assert stack.grad is not None and other.grad is None
        assert run_deferred_weight_grads(keep=1) == 0
        assert run_deferred_weight_grads() == 1
        assert other.grad is not None


def test_what_is_still_deferred_runs_at_the_end_of_the_scope():
    x, stack, offs, grad = _problem(torch.float32, True)
    with deferring_weight_grads():
        grouped_project(x, _weight(stack, True), offs).backward(grad)
        assert stack.grad is None
    assert stack.grad is not None
    # Outside the scope nothing waits.
    stack.grad = None
    grouped_project(x, _weight(stack, True), offs).backward(grad)
    assert stack.grad is not None and run_deferred_weight_grads() == 0


def test_an_input_gradient_pass_computes_no_weight_gradient():
    # A zero-bubble schedule's input pass asks for the inputs only: nothing is computed or deferred
    # for the weight, which its weight pass computes later.
    x, stack, offs, grad = _problem(torch.float32, True)
    seen = _hooked(stack)
    with deferring_weight_grads():
        inner = x * 1  # a non-leaf input, as the experts' rows are
        out = grouped_project(inner, _weight(stack, True), offs)
        (grad_inner,) = torch.autograd.grad(out, [inner], grad)
        assert grad_inner is not None
        assert run_deferred_weight_grads() == 0
    assert stack.grad is None and seen == []


def test_deferring_twice_at_once_is_refused():
    with deferring_weight_grads():
        with pytest.raises(RuntimeError, match="already being deferred"):
            with deferring_weight_grads():
                pass


def _fp8_grouped_mm(x, w, offs):
    return fp8_saved_grouped_mm(x, w, offs)


def _fp8_recomputed_down(x, w, offs):
    # x stands for gate and up both; the scale is the routed experts' combine weight per row.
    return fp8_recomputed_swiglu_down(x, x * 0.5, w, offs, scale=torch.linspace(0.1, 1.0, x.shape[0])[:, None])


@pytest.mark.parametrize("projection", [_fp8_grouped_mm, _fp8_recomputed_down], ids=["fp8-saved", "fp8-recomputed-down"])
@pytest.mark.parametrize("leaf", [False, True], ids=["view-of-parameter", "leaf-weight"])
def test_the_fp8_expert_projections_defer_their_weight_gradients_too(projection, leaf):
    # K2's configuration saves the experts' inputs as FP8 and recomputes the down-projection: those
    # projections have backwards of their own, which defer their weight gradients the same way.
    x, _, offs, _ = _problem(torch.float32, True)
    x = x.detach()[:, :8].contiguous().requires_grad_()  # [N, 8]: rows of width 8 projected to 16
    if leaf:  # the weight [E, 8, 16] itself a leaf
        stack = torch.randn(len(COUNTS), 8, 16).requires_grad_()
        weight = lambda: stack  # noqa: E731
    else:  # a transposed view of an [E, 16, 8] stack, as the experts pass theirs
        stack = torch.randn(len(COUNTS), 16, 8).requires_grad_()
        weight = lambda: stack.transpose(-2, -1)  # noqa: E731
    grad = torch.randn(sum(COUNTS), 16)
    projection(x, weight(), offs).backward(grad)
    want_x, want_w = x.grad, stack.grad
    x.grad = stack.grad = None
    with deferring_weight_grads():
        projection(x, weight(), offs).backward(grad)
        assert torch.equal(x.grad, want_x) and stack.grad is None
        assert run_deferred_weight_grads() == 1
        assert torch.equal(stack.grad, want_w)

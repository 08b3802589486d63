"""The grouped-GEMM expert path runs no per-expert Python loop and reads nothing back to the host,
except the one read-back of the EP all-to-all's counts (K2 §2.4: 24 local experts per rank;
a host sync per expert or per layer stalls the GPU behind the CPU).

On CPU a sync cannot be observed directly, so every Python-level way to read a tensor back
(`tolist`, `item`, `cpu`, `bool`, `int`, `float`) and `bincount` (whose CUDA kernel reads the largest id
back) are made to raise while the path runs forward and backward; the device benchmark runs it on
a GPU under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from k2train.config.schema import ModelConfig
from k2train.memory.policy import SavePolicy
from k2train.model.moe import MoE, Experts, Router

CFG = ModelConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8, experts_per_token=3)
READ_BACKS = ("tolist", "item", "cpu", "__bool__", "__int__", "__float__")


def _forbid_read_backs(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"the grouped expert path called {name}, a host read-back")
        return raise_

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "bincount", forbidden("torch.bincount"))
    monkeypatch.setattr(Experts, "forward_loop", forbidden("Experts.forward_loop"))


def _moe(fp8: bool, recompute: bool) -> MoE:
    torch.manual_seed(0)
    moe = MoE(CFG, policy=SavePolicy(fp8=fp8, recompute=recompute))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


@pytest.mark.parametrize("fp8, recompute", [(False, False), (True, False), (True, True)])
def test_grouped_moe_forward_backward_reads_nothing_back(monkeypatch, fp8, recompute):
    moe = _moe(fp8, recompute)
    x = torch.randn(2, 24, CFG.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with monkeypatch.context() as patched:
        _forbid_read_backs(patched)
        y, counts_E = moe(x)
        y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in moe.experts.parameters())
    # The same numbers as the per-expert reference loop.
    reference = _moe(fp8, recompute)
    reference.experts.impl = "loop"
    y_ref, counts_ref = reference(x.detach())
    assert torch.equal(counts_E, counts_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_router_counts_equal_bincount():
    router = Router(dataclasses.replace(CFG, num_experts=16, experts_per_token=4))
    torch.nn.init.normal_(router.weight)
    routing = router(torch.randn(50, CFG.hidden_size, generator=torch.Generator().manual_seed(2)))
    assert routing.counts_E.dtype == torch.int64
    assert torch.equal(routing.counts_E, torch.bincount(routing.expert_TK.flatten(), minlength=16))


def test_all_to_all_exchange_reads_the_counts_back_once(monkeypatch, tmp_path):
    # One gloo process is enough to count read-backs: the exchange's code path is the same.
    from parallel.experts import AllToAllExchange

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        moe = _moe(False, False)
        x_ND = torch.randn(12, CFG.hidden_size, requires_grad=True)
        weight_N = torch.rand(12, 1, requires_grad=True)  # the combine weights travel with the rows
        counts_E = torch.tensor([3, 0, 2, 1, 0, 4, 1, 1])
        calls = []
        tolist = torch.Tensor.tolist
        repeat_interleave = torch.Tensor.repeat_interleave

        def counted_tolist(t):
            calls.append("tolist")
            return tolist(t)

        def sized_repeat_interleave(t, repeats, *args, **kwargs):
            assert kwargs.get("output_size") is not None, "repeat_interleave without output_size reads the total back"
            return repeat_interleave(t, repeats, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        monkeypatch.setattr(torch.Tensor, "repeat_interleave", sized_repeat_interleave)
        y_ND = AllToAllExchange(dist.group.WORLD, 1)(x_ND, weight_N, counts_E, moe.experts)
        grad_ND = torch.randn_like(y_ND)
        grads = torch.autograd.grad(y_ND, (x_ND, weight_N), grad_ND)
        monkeypatch.undo()
        assert calls == ["tolist"]
        y_loop = moe.experts.forward_loop(x_ND, counts_E, weight_N)
        torch.testing.assert_close(y_ND, y_loop, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, torch.autograd.grad(y_loop, (x_ND, weight_N), grad_ND)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()

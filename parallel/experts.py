"""Expert parallelism: each EP rank holds E/EP experts and the routed rows travel by all-to-all.

K2 (§2.4) shards its 384 experts 16 ways, 24 per rank. Per MoE layer and micro-batch:
1. counts first: every rank tells every other how many of its rows go to each of their experts
   (an all-to-all of an [EP, E_local] int64 table, the one host sync the exchange needs);
2. the rows, sorted by global expert (so by destination rank), go out with an uneven
   all-to-all; what arrives is ordered by source rank, then by local expert;
3. the arrivals are regrouped by local expert, the local experts run once with
   torch._grouped_mm, and the outputs go back to their source rank by the reverse all-to-all.
No token is dropped and nothing is padded. Both all-to-alls are differentiable: the backward of
one is the all-to-all with the splits swapped.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from k2train.model import K2Model
from k2train.model.moe import Experts
from parallel.collectives import Collectives
from parallel.pipeline.overlap import HELD_WGRADS, Turns, all_to_all


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single over `group`: x [sum(in_splits), D] -> [sum(out_splits), D]."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], exchange: AllToAllExchange, held: int = 0):
        # The backward's exchange may go over its own group (parallel/pipeline/overlap.py runs backwards
        # beside forwards; each group must see its collectives in the same order on every rank).
        # `held`: deferred weight gradients the backward's exchange leaves to the next one.
        ctx.splits, ctx.exchange, ctx.held = (out_splits, in_splits), exchange, held
        out_MD = x_ND.new_empty(sum(out_splits), x_ND.shape[1])
        all_to_all(out_MD, x_ND.contiguous(), out_splits, in_splits, exchange.group, exchange.turns,
                   exchange.collectives)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        grad_ND = grad_MD.new_empty(sum(in_splits), grad_MD.shape[1])
        all_to_all(grad_ND, grad_MD.contiguous(), in_splits, out_splits, ctx.exchange.backward_group,
                   ctx.exchange.turns, ctx.exchange.collectives, backward=True, held=ctx.held)
        return grad_ND, None, None, None, None


class AllToAllExchange:
    """The MoE `ExpertExchange` of one EP rank: rows out to their expert's rank, outputs back."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, backward_group: dist.ProcessGroup | None = None,
                 turns: Turns | None = None, collectives: Collectives | None = None, held_wgrads: int = 0):
        self.group = group
        self.backward_group = group if backward_group is None else backward_group
        self.ep_size = ep_size
        self.turns = turns  # parallel.overlap: each exchange hands the turn to the paired micro-batch
        self.collectives = Collectives() if collectives is None else collectives
        # The experts' weight gradients the dispatch's backward exchange leaves to the next exchange
        # (parallel/pipeline/overlap.py HELD_WGRADS; 0 where nothing is deferred).
        self.held_wgrads = held_wgrads

    def __call__(self, x_ND: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        E_local, D = experts.num_local, x_ND.shape[1]
        send_counts_RL = counts_E.view(self.ep_size, E_local).contiguous()
        recv_counts_RL = torch.empty_like(send_counts_RL)
        # Counts first. They keep the turn: the exchange is tiny, and handing over here would set the
        # other task's long segment beside it and the big exchanges beside short ones.
        all_to_all(recv_counts_RL, send_counts_RL, None, None, self.group, None, self.collectives)
        # The exchange's one host sync: both split lists in one read-back.
        in_splits, out_splits = torch.stack([send_counts_RL.sum(dim=1), recv_counts_RL.sum(dim=1)]).tolist()

        # Each row travels with its combine weight as one more column: the experts apply it
        # (k2train/model/moe.py), and one exchange carries both.
        rows_MD = _AllToAll.apply(torch.cat([x_ND, weight_N], dim=1), out_splits, in_splits, self, self.held_wgrads)
        # Arrivals are grouped by source rank; the grouped GEMM wants them grouped by local expert.
        local_expert_M = torch.arange(E_local, device=x_ND.device).repeat(self.ep_size)
        # output_size is known here; without it repeat_interleave reads the total back (another sync).
        local_expert_M = local_expert_M.repeat_interleave(recv_counts_RL.flatten(), output_size=sum(out_splits))
        by_expert_M = torch.argsort(local_expert_M, stable=True)
        # Gathering the rows makes new, dense tensors: the weights' column is not carried into the GEMMs.
        y_MD = experts(rows_MD[by_expert_M, :D].contiguous(), recv_counts_RL.sum(dim=0), rows_MD[by_expert_M, D:])
        y_MD = y_MD[torch.argsort(by_expert_M)]
        return _AllToAll.apply(y_MD, in_splits, out_splits, self)


def apply_expert_parallel(model: K2Model, group: dist.ProcessGroup, ep_rank: int, ep_size: int,
                          backward_group: dist.ProcessGroup | None = None, turns: Turns | None = None,
                          collectives: Collectives | None = None) -> None:
    """Route every MoE layer of `model` (a part holding experts of EP rank `ep_rank`) through `group`
    (the backward's exchanges through `backward_group` when given, taking `turns` when overlapped),
    calling the all-to-alls through `collectives` (the rank's ParallelState.collectives)."""
    if ep_size == 1:
        return
    for i in model.moe_layers():
        moe = model.layers[str(i)].mlp
        expected = ep_rank * moe.experts.num_local
        if moe.experts.first_expert != expected or moe.experts.num_local * ep_size != model.cfg.num_experts:
            raise ValueError(
                f"layer {i} holds experts {moe.experts.first_expert}..{moe.experts.first_expert + moe.experts.num_local - 1}, "
                f"but EP rank {ep_rank} of {ep_size} owns {expected}..{expected + model.cfg.num_experts // ep_size - 1}."
            )
        deferring = turns is not None and turns.delay_wgrad
        held = HELD_WGRADS if deferring else 0
        moe.exchange = AllToAllExchange(group, ep_size, backward_group, turns, collectives, held)
        if deferring:  # the paired backward defers these weight gradients
            moe.experts.policy = replace(moe.experts.policy, deferrable_wgrad=True)

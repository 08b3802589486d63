"""Gradient reduction and the global gradient norm over the PP x EP x DP layout (DESIGN §2).

Every EP x DP rank of a stage runs its own sequences, each loss a mean over that rank's micro-batches.
The step's loss is the mean over all ep*dp sequence ranks, so:
- a dense parameter (replicated on the ep*dp ranks of its stage) needs the SUM of their gradients
  over the dense group, divided by ep*dp;
- an expert parameter lives on one EP rank, whose backward already gathered, through the
  all-to-all, the contributions of every EP rank's tokens: it needs the SUM over the DP group of
  its replicas, also divided by ep*dp.
Gradients are reduced in one flat bucket per group. The ZeRO-1 optimizer replaces `reduce` with a
reduce-scatter that delivers each gradient to the rank owning it; the buckets are the unit it keeps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.state import ParallelState


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


class GradientReducer:
    """Averages a rank's gradients over the sequence ranks of its stage, one collective per group."""

    def __init__(self, module: nn.Module, state: ParallelState):
        self.state = state
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.dense = [p for n, p in named if not is_expert_param(n)]
        self.expert = [p for n, p in named if is_expert_param(n)]
        self.divisor = state.layout.sequence_ranks

    @torch.no_grad()
    def reduce(self) -> None:
        """all_reduce(SUM) of the dense bucket over the EP x DP group and of the expert bucket over DP,
        then divide both by ep*dp."""
        for params, group in ((self.dense, self.state.dense_group), (self.expert, self.state.expert_grad_group)):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            flat = _flatten_dense_tensors(grads)
            if group is not None:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            if self.divisor != 1:
                flat.div_(self.divisor)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    @torch.no_grad()
    def clip_(self, max_norm: float) -> float:
        """The global L2 norm of the step's gradient (each parameter counted once), and clipping to
        `max_norm` (0: no clipping) with torch.nn.utils.clip_grad_norm_'s rule.

        Dense gradients are replicated on ep*dp ranks and expert gradients on dp ranks, so one world
        all_reduce of (dense² / (ep*dp) + expert² / dp) counts each parameter exactly once.
        """
        layout = self.state.layout
        dense_sq = sum((p.grad.double().square().sum() for p in self.dense if p.grad is not None), torch.zeros((), dtype=torch.float64))
        expert_sq = sum((p.grad.double().square().sum() for p in self.expert if p.grad is not None), torch.zeros((), dtype=torch.float64))
        total_sq = (dense_sq / layout.sequence_ranks + expert_sq / layout.dp).to(self.state.device)
        if self.state.is_distributed:
            dist.all_reduce(total_sq, op=dist.ReduceOp.SUM)
        norm = total_sq.sqrt().item()
        if max_norm > 0:
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                for p in self.dense + self.expert:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

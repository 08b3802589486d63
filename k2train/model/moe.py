"""Mixture of experts: sigmoid router with aux-loss-free balancing, routed and shared experts.

K2_REFERENCE §1: scores are sigmoids of the router logits; a per-expert bias is added to the scores
for top-k *selection only*; the combine weights are the unbiased scores of the chosen experts,
normalised to sum 1 and multiplied by `routed_scaling_factor`. No expert grouping, no token dropping.
The bias is a buffer, moved by `update_router_bias_` from the step's expert loads (DeepSeek-V3's
aux-loss-free rule), never by gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from k2train.config.schema import ModelConfig
from k2train.model.ffn import SwiGLU


class Routing(NamedTuple):
    """The router's decision for T tokens with top-k experts each."""

    expert_TK: torch.Tensor  # int64 expert ids
    weight_TK: torch.Tensor  # combine weights, float32
    counts_E: torch.Tensor  # int64 tokens routed to each expert


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # Routing runs in float32 whatever the compute dtype: top-k on bf16 scores flips near-ties.
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        expert_TK = torch.topk(scores_TE + self.e_score_correction_bias, self.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, expert_TK)
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        counts_E = torch.bincount(expert_TK.flatten(), minlength=self.weight.shape[0])
        return Routing(expert_TK, weight_TK, counts_E)


class Experts(nn.Module):
    """E routed SwiGLU experts stored as 3-D tensors [E, out, in] (each slice is one expert's matrix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = cfg.expert_impl

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.impl == "loop":
            return self.forward_loop(x_TD, routing)
        return self.forward_grouped(x_TD, routing)

    def forward_grouped(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sort the T*k (token, expert) pairs by expert and run each weight once with torch._grouped_mm."""
        top_k = routing.expert_TK.shape[1]
        order_N = torch.argsort(routing.expert_TK.flatten(), stable=True)
        token_N = order_N // top_k
        offsets_E = torch.cumsum(routing.counts_E, dim=0).to(torch.int32)
        x_ND = x_TD[token_N]
        gate_NI = torch._grouped_mm(x_ND, self.gate_proj.transpose(-2, -1), offs=offsets_E)
        up_NI = torch._grouped_mm(x_ND, self.up_proj.transpose(-2, -1), offs=offsets_E)
        y_ND = torch._grouped_mm(F.silu(gate_NI) * up_NI, self.down_proj.transpose(-2, -1), offs=offsets_E)
        y_ND = y_ND * routing.weight_TK.flatten()[order_N, None].to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)

    def forward_loop(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The reference: one plain SwiGLU per expert over the tokens routed to it."""
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.gate_proj.shape[0]):
            token_M, slot_M = torch.where(routing.expert_TK == e)
            if token_M.numel() == 0:
                continue
            x_MD = x_TD[token_M]
            h_MI = F.silu(x_MD @ self.gate_proj[e].T) * (x_MD @ self.up_proj[e].T)
            y_MD = (h_MI @ self.down_proj[e].T) * routing.weight_TK[token_M, slot_M, None].to(x_TD.dtype)
            out_TD.index_add_(0, token_M, y_MD)
        return out_TD


class MoE(nn.Module):
    """x_BSD -> (y_BSD, counts_E): routed experts plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts > 0
            else None
        )

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.gate(x_TD)
        y_TD = self.experts(x_TD, routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD), routing.counts_E


@torch.no_grad()
def update_router_bias_(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

    counts_E must be the loads of the whole optimizer step (all micro-batches, and all data-parallel
    ranks once distributed), so every replica moves its bias identically.
    """
    load_E = counts_E.float()
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))

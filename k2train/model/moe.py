"""Mixture of experts: sigmoid router with aux-loss-free balancing, routed and shared experts.

K2 §2.3: scores are sigmoids of the router logits; a per-expert bias is added to the scores
for top-k *selection only*; the combine weights are the unbiased scores of the chosen experts,
normalised to sum 1 and multiplied by `routed_scaling_factor`. No expert grouping, no token dropping.
The bias is a buffer, moved by `update_router_bias_` from the step's expert loads (DeepSeek-V3's
aux-loss-free rule), never by gradients.

The routed path is: sort the (token, expert) pairs by expert, hand the sorted rows and their
combine weights to an `ExpertExchange`, which returns each row's expert output times its weight,
then scatter-add them back to their tokens. On one process the exchange runs the experts in place;
with expert parallelism (`parallel/experts.py`) it sends rows and weights to the rank owning their
expert and the weighted outputs back. The model only sees the interface, so it stays free of
torch.distributed.

The weights are applied by the experts, after their down-projection, not after the exchange: with
selective recomputation the multiplication is then recomputed with the down-projection, and
neither the expert outputs nor the weighted outputs wait for backward (K2 §2.4.3 recomputes the
MoE down-projections). The scatter-add saves only its row indices (`combine_rows`). The values are
those of weighting after the exchange, bit for bit: the exchange only moves rows.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from k2train.config.schema import ModelConfig
from k2train.memory.policy import SavePolicy, swiglu_ffn
from k2train.model.ffn import SwiGLU


class Routing(NamedTuple):
    """The router's decision for T tokens with top-k experts each."""

    expert_TK: torch.Tensor  # int64 global expert ids
    weight_TK: torch.Tensor  # combine weights, float32
    counts_E: torch.Tensor  # int64 tokens routed to each of the E experts


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
        # A scatter-add, not bincount: bincount on CUDA reads the max id back to the host (a sync).
        expert_N = expert_TK.flatten()
        counts_E = expert_N.new_zeros(self.weight.shape[0]).scatter_add_(0, expert_N, torch.ones_like(expert_N))
        return Routing(expert_TK, weight_TK, counts_E)


class Experts(nn.Module):
    """Routed SwiGLU experts first_expert .. first_expert+num_local-1, stored as 3-D tensors
    [E_local, out, in] (each slice is one expert's matrix, as in the checkpoint). `policy` (K2 §2.4.3):
    what the grouped path saves for backward."""

    def __init__(self, cfg: ModelConfig, first_expert: int = 0, num_local: int | None = None,
                 policy: SavePolicy = SavePolicy()):
        super().__init__()
        E = cfg.num_experts if num_local is None else num_local
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.first_expert = first_expert
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = cfg.expert_impl
        self.policy = policy

    @property
    def num_local(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of x_ND sorted by local expert, counts_E[e] rows for expert e -> their outputs, times
        the rows' combine weights weight_N [N, 1] (x's dtype) when given."""
        if self.impl == "loop":
            return self.forward_loop(x_ND, counts_E, weight_N)
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        gate_EDI, up_EDI = self.gate_proj.transpose(-2, -1), self.up_proj.transpose(-2, -1)
        return swiglu_ffn(self.policy, x_ND, gate_EDI, up_EDI, self.down_proj.transpose(-2, -1), offsets_E,
                          scale=weight_N)

    def forward_loop(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None) -> torch.Tensor:
        """The reference: one plain SwiGLU per expert over its rows."""
        outputs = []
        for e, x_MD in enumerate(x_ND.split(counts_E.tolist())):
            h_MI = F.silu(x_MD @ self.gate_proj[e].T) * (x_MD @ self.up_proj[e].T)
            outputs.append(h_MI @ self.down_proj[e].T)
        y_ND = torch.cat(outputs)
        return y_ND if weight_N is None else y_ND * weight_N


class ExpertExchange(Protocol):
    """Runs the routed experts on rows sorted by global expert id (counts_E rows per expert) and
    returns their outputs times the rows' combine weights weight_N [N, 1]."""

    def __call__(self, x_ND: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor,
                 experts: Experts) -> torch.Tensor: ...


def local_exchange(x_ND: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor, experts: Experts) -> torch.Tensor:
    """All experts live here: run them directly."""
    return experts(x_ND, counts_E, weight_N)


class _CombineRows(torch.autograd.Function):
    """zeros(T, D).index_add_(0, token_N, y_ND), saving only token_N: index_add_'s own backward
    keeps its source alive, though the source's gradient is just the output's rows."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, token_N: torch.Tensor, tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token_N)
        return y_ND.new_zeros(tokens, y_ND.shape[1]).index_add_(0, token_N, y_ND)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        (token_N,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_N), None, None


def combine_rows(y_ND: torch.Tensor, token_N: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each token's rows of y_ND summed: [N, D] -> [tokens, D], in row order."""
    return _CombineRows.apply(y_ND, token_N, tokens)


class MoE(nn.Module):
    """x_BSD -> (y_BSD, counts_E): routed experts plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig, first_expert: int = 0, num_local_experts: int | None = None,
                 policy: SavePolicy = SavePolicy()):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg, first_expert, num_local_experts, policy)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts, policy)
            if cfg.num_shared_experts > 0
            else None
        )
        self.exchange: ExpertExchange = local_exchange

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.gate(x_TD)
        top_k = routing.expert_TK.shape[1]
        order_N = torch.argsort(routing.expert_TK.flatten(), stable=True)
        token_N = order_N // top_k
        weight_N = routing.weight_TK.flatten()[order_N, None].to(x_TD.dtype)
        y_ND = self.exchange(x_TD[token_N], weight_N, routing.counts_E, self.experts)
        y_TD = combine_rows(y_ND, token_N, x_TD.shape[0])
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

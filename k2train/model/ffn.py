"""SwiGLU feed-forward, used by the dense layers and the shared expert (K2 §2.3)."""

import torch
from torch import nn

from k2train.memory.policy import SavePolicy, swiglu_ffn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x_TD -> y_TD. `policy` (K2 §2.4.3): what waits for backward."""

    def __init__(self, dim: int, intermediate: int, policy: SavePolicy = SavePolicy()):
        super().__init__()
        self.policy = policy
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_ffn(self.policy, x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)

"""RMSNorm (K2 §2.3 and the released config.json: RMSNorm, eps 1e-6), computed in float32 like the DeepseekV3 reference."""

import torch
from torch import nn

from k2train.memory.policy import SavePolicy
from k2train.memory.recompute import recomputed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, policy: SavePolicy = SavePolicy()):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.policy = policy  # memory.selective_recompute: keep only x for backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recomputed(self.policy.recompute, self._normalise, x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x_f32 = x.float()
        x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_f32.to(x.dtype)

"""SwiGLU feed-forward, used by the dense layers and the shared expert (K2 §2.3)."""

import torch
import torch.nn.functional as F
from torch import nn

from k2train.memory.fp8 import fp8_saved_linear, fp8_saved_swiglu, quantize_shared_input
from k2train.memory.fp8_recompute import fp8_recomputed_swiglu_down
from k2train.memory.recompute import recomputed


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x_TD -> y_TD."""

    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        # memory.fp8_activations: keep the up-projection and SwiGLU inputs for backward as FP8 tiles.
        self.fp8_storage = False
        # memory.selective_recompute: SwiGLU and the down-projection keep only gate and up.
        self.recompute = False
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_storage:
            # x is quantised once and saved once for both projections.
            x_fp8 = quantize_shared_input(x, self.gate_proj.weight, self.up_proj.weight)
            gate = fp8_saved_linear(x, self.gate_proj.weight, shared=x_fp8)
            up = fp8_saved_linear(x, self.up_proj.weight, shared=x_fp8)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.recompute and self.fp8_storage:
            # Both features (K2 §2.4.3): only FP8 gate and up wait; SwiGLU and down run again from them.
            return fp8_recomputed_swiglu_down(gate, up, self.down_proj.weight)
        return recomputed(self.recompute, self._activate_down, gate, up)

    def _activate_down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        hidden = fp8_saved_swiglu(gate, up) if self.fp8_storage else F.silu(gate) * up
        return self.down_proj(hidden)

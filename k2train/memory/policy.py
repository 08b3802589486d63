"""What waits for backward, decided once per model, and the SwiGLU feed-forward that follows it (K2 §2.4.3).

`SavePolicy` names the two activation-memory features a model uses: FP8 storage of the
up-projection and SwiGLU inputs (memory.fp8_activations) and selective recomputation
(memory.selective_recompute). It is frozen, decided from the memory config and handed to the model
when the model is built; every module reads it as it computes, and nothing is switched on a built
model.

`swiglu_ffn` is the one place where the two features meet in a feed-forward: the dense SwiGLU
(dense layers, shared experts; F.linear) and the routed experts (torch._grouped_mm over rows sorted
by expert) both run it, and each combination saves:
- neither: x, gate, up and the SwiGLU output, in the compute dtype;
- fp8: x once (shared by gate and up), gate and up as FP8 tiles; the SwiGLU output as is;
- recompute: x, gate and up; SwiGLU and the down-projection run again in backward;
- both: x, gate and up as FP8 tiles only; SwiGLU and down run again from them (fp8_recompute.py).

The routed experts pass their combine weights as `scale`, one per row: the output rows are
multiplied by them inside the down-projection's stage. With recomputation the multiplication runs
again in backward too, so the down-projection's output, the largest tensor of a MoE layer, is not
saved (K2 §2.4.3 recomputes the MoE down-projections); without it the multiplication saves that
output, as a plain `y * w` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from k2train.config.schema import MemoryConfig
from k2train.memory.fp8 import fp8_saved_grouped_mm, fp8_saved_linear, fp8_saved_swiglu, quantize_shared_input
from k2train.memory.fp8_recompute import fp8_recomputed_swiglu_down, project
from k2train.memory.recompute import recomputed


@dataclass(frozen=True)
class SavePolicy:
    """Which activation-memory features a model's modules use (K2 §2.4.3); the default is neither."""

    fp8: bool = False  # memory.fp8_activations: the up-projection and SwiGLU inputs wait as FP8 tiles
    recompute: bool = False  # memory.selective_recompute: cheap, large stages run again in backward
    # The routed experts' weight gradients may wait for the backward's exchange (weight_grads.py); set
    # on the experts by the overlap runtime (parallel/experts.py), which alone defers them.
    deferrable_wgrad: bool = False

    @classmethod
    def from_config(cls, memory: MemoryConfig) -> SavePolicy:
        return cls(fp8=memory.fp8_activations, recompute=memory.selective_recompute)


def swiglu_ffn(policy: SavePolicy, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, offs: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) [* scale], saving for backward what `policy` says.

    Dense (offs None): x [..., D]; w_gate, w_up [I, D] and w_down [D, I] (nn.Linear weights) -> [..., D].
    Grouped (routed experts): x [N, D] sorted by expert; w_gate, w_up [E, D, I] and w_down [E, I, D]
    (transposed views of the [E, out, in] stacks); offs int32 cumulative rows per expert -> [N, D];
    scale [N, 1] in x's dtype, the rows' combine weights.
    """
    if policy.fp8:
        # x is quantised once and saved once for both projections.
        x_fp8 = quantize_shared_input(x, w_gate, w_up)
        gate, up = _fp8_project(x, w_gate, offs, x_fp8), _fp8_project(x, w_up, offs, x_fp8)
    else:
        gate, up = project(x, w_gate, offs, policy.deferrable_wgrad), project(x, w_up, offs, policy.deferrable_wgrad)
    if policy.recompute and policy.fp8:
        # Both features (K2 §2.4.3): only FP8 gate and up wait; SwiGLU and down run again from them.
        return fp8_recomputed_swiglu_down(gate, up, w_down, offs, scale=scale)
    # The region's inputs are the activations only: the weights live anyway and are read inside.
    activate_down = partial(_activate_down, policy, w_down)
    return recomputed(policy.recompute, activate_down, gate, up, offs, scale)


def _fp8_project(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None, x_fp8) -> torch.Tensor:
    return fp8_saved_linear(x, w, shared=x_fp8) if offs is None else fp8_saved_grouped_mm(x, w, offs, shared=x_fp8)


def _activate_down(policy: SavePolicy, w_down: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   offs: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    hidden = fp8_saved_swiglu(gate, up) if policy.fp8 else F.silu(gate) * up
    out = project(hidden, w_down, offs, policy.deferrable_wgrad)
    return out if scale is None else out * scale

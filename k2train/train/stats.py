"""What one optimizer step measures, accumulated over its micro-batches.

The per-head max logits are a running MAX over micro-batches (QK-Clip acts on the largest logit
of the whole step, K2_REFERENCE §2) and the expert loads a SUM (the bias update uses the step's
total loads). Both are reduced across ranks by the distributed driver before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from k2train.config.schema import ModelConfig
from k2train.model import ModelOutput


@dataclass
class StepStats:
    loss_sum: torch.Tensor  # sum of micro-batch mean losses
    max_logits_LH: torch.Tensor
    counts_ME: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, device: torch.device) -> StepStats:
        return cls(
            loss_sum=torch.zeros((), device=device),
            max_logits_LH=torch.full((cfg.num_layers, cfg.num_heads), float("-inf"), device=device),
            counts_ME=torch.zeros(cfg.num_moe_layers, cfg.num_experts, dtype=torch.int64, device=device),
        )

    def add_micro_batch(self, loss: torch.Tensor, out: ModelOutput) -> None:
        self.loss_sum += loss.float()
        self.max_logits_LH = torch.maximum(self.max_logits_LH, out.max_logits_LH)
        self.counts_ME += out.expert_counts_ME

    def mean_loss(self, micro_batches: int) -> float:
        return (self.loss_sum / micro_batches).item()

    def record(
        self, *, step: int, loss: float, lr: float, grad_norm: float, clipped: list[int], step_time: float,
        tokens: int, tokens_per_s: float, router_biases: list[torch.Tensor], elapsed: float,
    ) -> dict[str, Any]:
        """The metrics record of the step (keys of k2train.train.metrics.STEP_KEYS)."""
        max_logits = self.max_logits_LH.cpu()
        load_ME = self.counts_ME.cpu().double()
        load_ME = load_ME / load_ME.sum(dim=1, keepdim=True).clamp(min=1)
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tokens": tokens,
            "step_time_s": step_time,
            "elapsed_s": elapsed,
            "grad_norm": grad_norm,
            "max_logit": max_logits.tolist(),
            "max_logit_layer": max_logits.amax(dim=1).tolist(),
            "qk_clipped_heads": list(clipped),
            "expert_load": load_ME.tolist(),
            "expert_load_imbalance": (load_ME.amax(dim=1) / load_ME.mean(dim=1).clamp(min=1e-12)).tolist(),
            "router_bias_abs_mean": [b.abs().mean().item() for b in router_biases],
        }

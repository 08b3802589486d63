"""What one optimizer step measured, and the metrics record made of it.

The per-head max logits are the MAX over the step's micro-batches and ranks (QK-Clip acts on the
largest logit of the whole step, K2 §2.1) and the expert loads the SUM (the bias update
uses the step's total loads); the step runner reduces both before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over every micro-batch of every sequence rank
    max_logits_LH: torch.Tensor  # every layer, every head
    counts_ME: torch.Tensor  # every MoE layer, every expert: tokens routed (int64)


def step_record(
    result: StepResult, *, step: int, lr: float, grad_norm: float, clipped: list[int], step_time: float,
    tokens: int, tokens_per_s: float, router_bias_abs_mean: list[float], elapsed: float,
) -> dict[str, Any]:
    """The metrics record of the step (keys of k2train.train.metrics.STEP_KEYS)."""
    max_logits = result.max_logits_LH.cpu()
    load_ME = result.counts_ME.cpu().double()
    load_ME = load_ME / load_ME.sum(dim=1, keepdim=True).clamp(min=1)
    return {
        "step": step,
        "loss": result.loss,
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
        "router_bias_abs_mean": list(router_bias_abs_mean),
    }

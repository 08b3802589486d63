"""MuonClip on one process (K2 §2.1, Algorithm 1): Muon for hidden matrices, AdamW for
the rest, and QK-Clip after the step.

Muon, per hidden matrix W [n, m] with gradient G (each expert's [I, D] slice of a 3-D expert tensor
is its own matrix):
    M = μ·M + G;  U = μ·M + G (Nesterov, as Moonlight) or M;
    O = NewtonSchulz(U) · update_rms · sqrt(max(n, m));   W -= lr·(O + λ·W).
The sqrt(max(n, m)) factor makes the update's RMS about `update_rms` (0.2, AdamW's typical RMS) for
an exactly orthogonal NewtonSchulz output, so one lr and λ serve both optimizers. With the K2
coefficients the output's singular values sit in about [0.7, 1.2], so the RMS is 0.2 times the RMS
of those singular values (measured 0.16 to 0.19 in tests/test_optim.py), not exactly 0.2.
AdamW (bias-corrected, decoupled decay with the same lr and λ) updates the embedding, the output
head, the norms and every 1-D parameter. The router bias is a buffer updated by the model's load
rule, so it never reaches the optimizer.

This is the single-process reference: parameters must be float32 and are updated in place. The bf16
parameter / float32 master-weight path is the sharded optimizer's (docs/ARCHITECTURE.md#zero-1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from k2train.config.schema import OptimizerConfig
from k2train.optim.newton_schulz import K2_NS_COEFFICIENTS, newton_schulz_many
from k2train.optim.qk_clip import clip_attention_modules_

NamedParams = list[tuple[str, nn.Parameter]]

# Matrices that are lookup tables or the output head, not hidden linear maps: AdamW, as in K2 §2.
ADAMW_MATRIX_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


def split_param_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> tuple[NamedParams, NamedParams]:
    """(muon_named, adamw_named) from (name, param) pairs, keeping their order; frozen params are dropped.

    Muon: every param with ndim >= 2 except the embedding and the output head, so the attention and
    FFN projections, the 3-D expert stacks (one matrix per expert) and the MoE router `gate.weight`
    [E, D]. The router is a hidden linear map from the residual stream to expert scores like any
    projection, and K2 names only embeddings, head, norms and non-matrix params as AdamW's, so it is
    treated as a 2-D hidden matrix. AdamW: the embedding, the head, norms and every 1-D param.
    """
    muon_named: NamedParams = []
    adamw_named: NamedParams = []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and not name.endswith(ADAMW_MATRIX_SUFFIXES):
            muon_named.append((name, param))
        else:
            adamw_named.append((name, param))
    return muon_named, adamw_named


def _check_float32(named_params: NamedParams) -> None:
    for name, param in named_params:
        if param.dtype != torch.float32:
            raise TypeError(
                f"Parameter '{name}' is {param.dtype}; the single-process MuonClip (k2train/optim/muon_clip.py) "
                "expects float32 parameters, the bf16 master-weight path belongs to the sharded optimizer."
            )


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in two param groups ("use_muon" True/False) whose "lr" the schedule sets each step.

    `step()` applies the update; `qk_clip_(max_logits_LH)` then rescales the attention weights of
    heads whose max logit exceeded τ (a separate call because the max logits are a global statistic
    of the whole step, reduced by the caller).
    """

    def __init__(
        self,
        muon_named: NamedParams,
        adamw_named: NamedParams,
        *,
        lr: float,
        weight_decay: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = K2_NS_COEFFICIENTS,
        ns_dtype: torch.dtype = torch.bfloat16,
        update_rms: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        attention_modules: Sequence[nn.Module] = (),
        qk_clip_tau: float | None = 100.0,
    ):
        _check_float32(muon_named + adamw_named)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum {momentum} must lie in [0, 1) (optimizer.muon_momentum).")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW betas {betas} must lie in [0, 1) (optimizer.adam_beta1/adam_beta2).")
        if ns_steps < 1:
            raise ValueError(f"Newton-Schulz steps {ns_steps} must be at least 1 (optimizer.ns_steps).")
        muon = dict(
            use_muon=True, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype, update_rms=update_rms,
        )
        adamw = dict(use_muon=False, betas=betas, eps=eps)
        groups = [{"params": muon_named, **muon}, {"params": adamw_named, **adamw}]
        super().__init__([g for g in groups if g["params"]], dict(lr=lr, weight_decay=weight_decay))
        self.attention_modules = list(attention_modules)
        self.qk_clip_tau = qk_clip_tau

    @classmethod
    def from_config(cls, model: nn.Module, cfg: OptimizerConfig) -> MuonClip:
        """Build from a model (its named parameters and, if it has them, `attention_modules()`) and config."""
        muon_named, adamw_named = split_param_groups(model.named_parameters())
        attention = list(model.attention_modules()) if hasattr(model, "attention_modules") else []
        return cls(
            muon_named, adamw_named, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, ns_coefficients=cfg.ns_coefficients,
            ns_dtype=getattr(torch, cfg.ns_dtype),
            update_rms=cfg.update_rms, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            attention_modules=attention, qk_clip_tau=cfg.qk_clip_tau if cfg.qk_clip else None,
        )

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group (called each step with the schedule's value)."""
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    @torch.no_grad()
    def qk_clip_(self, max_logits_LH: Tensor) -> list[int]:
        """QK-Clip the attention modules given the step's global max logits [L, H]; clipped heads per layer.

        With QK-Clip off (qk_clip_tau None) nothing changes and every count is 0.
        """
        if self.qk_clip_tau is None:
            return [0] * len(self.attention_modules)
        return clip_attention_modules_(self.attention_modules, max_logits_LH, self.qk_clip_tau)

    def _muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        ns_inputs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ns_inputs.append(muon_momentum_(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"]))
        updates = newton_schulz_many(ns_inputs, group["ns_steps"], group["ns_coefficients"], group["ns_dtype"])
        for p, update in zip(params, updates):
            apply_muon_update_(p, update, group["lr"], group["weight_decay"], group["update_rms"])

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(),
                          group["lr"], group["weight_decay"], beta1, beta2, group["eps"])


# The per-tensor rules, shared with the sharded optimizer (parallel/zero1/optimizer.py) so both compute the same.


def muon_momentum_(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """M = μ·M + G in place; returns what Newton-Schulz orthogonalises: μ·M + G (Nesterov) or M."""
    buf.mul_(momentum).add_(grad)
    return grad.add(buf, alpha=momentum) if nesterov else buf


def apply_muon_update_(param: Tensor, orthogonal: Tensor, lr: float, weight_decay: float, update_rms: float) -> None:
    """W = W·(1 - lr·λ) - lr·update_rms·sqrt(max(n, m))·O (decoupled decay, update-RMS matching)."""
    scale = update_rms * math.sqrt(max(param.shape[-2], param.shape[-1]))
    param.mul_(1 - lr * weight_decay)
    param.add_(orthogonal, alpha=-lr * scale)


def adamw_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
    lr: float, weight_decay: float, beta1: float, beta2: float, eps: float,
) -> None:
    """One AdamW step (step counts from 1): the same operations, in the same order, as
    torch.optim.AdamW's single-tensor path."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))

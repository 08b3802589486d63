"""Multi-head Latent Attention (MLA) that reports each head's maximum pre-softmax logit.

K2 (§2.3) uses DeepSeek-V3's MLA: q goes through a low-rank bottleneck
(q_a_proj -> RMSNorm -> q_b_proj); keys and values come from a 512-dim latent plus one 64-dim rope
key shared by all heads (kv_a_proj_with_mqa -> RMSNorm -> kv_b_proj). QK-Clip (K2 §2.1) needs, per
head, the largest logit q·k·scale of the step, so the forward returns it as a by-product: the
eager path already materialises the logits, and taking their masked max costs one reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2train.config.schema import ModelConfig
from k2train.kernels import use_triton
from k2train.memory.policy import SavePolicy
from k2train.memory.recompute import recomputed
from k2train.model.norm import RMSNorm
from k2train.model.rope import apply_rope


def causal_attention_with_max_logits(
    q_BHSK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSV: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention; returns (out_BHSV, max_logit_H).

    max_logit_H is the max over batch, queries and visible keys of q·k·scale, detached: it is a
    statistic for QK-Clip, not part of the loss. On CUDA a Triton flash-attention kernel computes
    both without materialising the logits (docs/ARCHITECTURE.md#h200-limits); elsewhere the eager reference does.
    """
    if use_triton(q_BHSK):
        # Imported here: Triton may be absent, and the kernels are built when the module loads.
        from k2train.kernels.flash_attention import flash_attention_with_max_logits

        return flash_attention_with_max_logits(q_BHSK, k_BHSK, v_BHSV, scale)
    return eager_causal_attention_with_max_logits(q_BHSK, k_BHSK, v_BHSV, scale)


def eager_causal_attention_with_max_logits(
    q_BHSK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSV: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for the kernel: materialises the [B, H, S, S] logits, so the max is one reduction."""
    seq = q_BHSK.shape[-2]
    logits_BHSS = torch.matmul(q_BHSK, k_BHSK.transpose(-1, -2)) * scale
    visible_SS = torch.ones(seq, seq, dtype=torch.bool, device=q_BHSK.device).tril()
    logits_BHSS = logits_BHSS.masked_fill(~visible_SS, float("-inf"))
    max_logit_H = logits_BHSS.detach().amax(dim=(0, 2, 3)).float()
    probs_BHSS = F.softmax(logits_BHSS, dim=-1, dtype=torch.float32).to(q_BHSK.dtype)
    return torch.matmul(probs_BHSS, v_BHSV), max_logit_H


def _up_project(latent: torch.Tensor, norm: nn.Module, proj: nn.Module) -> torch.Tensor:
    return proj(norm(latent))


class MLA(nn.Module):
    """x_BSD -> (y_BSD, max_logit_H). Parameter names follow the DeepseekV3 checkpoint layout.

    q_b_proj rows are grouped per head: [nope (dn) | rope (dr)] x H. kv_b_proj rows likewise:
    [k nope (dn) | value (dv)] x H. kv_a_proj_with_mqa yields [latent (kv_lora_rank) | shared rope key (dr)].
    """

    def __init__(self, cfg: ModelConfig, softmax_scale: float, policy: SavePolicy = SavePolicy()):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = softmax_scale
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, policy)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, policy)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.policy = policy

    def forward(
        self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x_BSD.shape
        H, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim

        # The up-projections (latent norm + q_b / kv_b) are cheap and their outputs large: with
        # memory.selective_recompute only the low-rank latents are kept for backward (K2 §2.4.3).
        q_latent = self.q_a_proj(x_BSD)
        q_BHSK = recomputed(self.policy.recompute, _up_project, q_latent, self.q_a_layernorm, self.q_b_proj)
        q_BHSK = q_BHSK.view(B, S, H, dn + dr).transpose(1, 2)
        q_nope, q_rope = q_BHSK.split([dn, dr], dim=-1)

        latent, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, dr], dim=-1)
        kv_BHSK = recomputed(self.policy.recompute, _up_project, latent, self.kv_a_layernorm, self.kv_b_proj)
        kv_BHSK = kv_BHSK.view(B, S, H, dn + dv).transpose(1, 2)
        k_nope, v_BHSV = kv_BHSK.split([dn, dv], dim=-1)

        # Decoupled RoPE: one rope key per position, shared by every head.
        q_rope = apply_rope(q_rope, cos_SF, sin_SF)
        k_rope_B1SR = apply_rope(k_rope_BSR.unsqueeze(1), cos_SF, sin_SF)
        q_BHSK = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSK = torch.cat([k_nope, k_rope_B1SR.expand(B, H, S, dr)], dim=-1)

        out_BHSV, max_logit_H = causal_attention_with_max_logits(q_BHSK, k_BHSK, v_BHSV, self.softmax_scale)
        return self.o_proj(out_BHSV.transpose(1, 2).reshape(B, S, H * dv)), max_logit_H

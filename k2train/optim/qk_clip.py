"""QK-Clip (K2 §2.1): rescale the query/key weights of heads whose max logit exceeded τ.

After the optimizer step, a head h with S_max^h > τ gets γ = τ / S_max^h. MLA's logit for head h is
    (q_nope · k_nope + q_rope · k_rope) · scale,
where q_nope comes from W_qc (the head's first dn rows of q_b_proj), k_nope from W_kc (the head's first
dn rows of kv_b_proj), q_rope from W_qr (the head's last dr rows of q_b_proj) and k_rope from the one
rope key shared by all heads (the last dr rows of kv_a_proj_with_mqa). Scaling W_qc and W_kc by sqrt(γ)
and W_qr by γ scales both terms, hence the head's every logit, by exactly γ, without touching the
shared rope key (which other heads read) or the value rows (which do not enter the logit).
The row-scaling math is pure and written against raw weight tensors; `clip_attention_modules_`
applies it to the model's MLA modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def qk_clip_scales(max_logits_H: Tensor, tau: float) -> Tensor:
    """gamma_H (float32, [H]): τ / S_max for heads with S_max > τ, exactly 1 for the others."""
    if tau <= 0:
        raise ValueError(f"QK-Clip threshold tau={tau} must be positive (optimizer.qk_clip_tau).")
    max_logits_H = max_logits_H.detach().float()
    if not torch.isfinite(max_logits_H).all():
        # γ = τ / inf would zero the head's weights for good; a non-finite logit is a diverged step.
        raise ValueError(f"QK-Clip got non-finite max logits {max_logits_H.tolist()}; expected finite per-head maxima.")
    return torch.where(max_logits_H > tau, tau / max_logits_H, torch.ones_like(max_logits_H))


@torch.no_grad()
def apply_qk_clip_(
    q_b_weight: Tensor, kv_b_weight: Tensor, gamma_H: Tensor, nope: int, rope: int, v: int
) -> Tensor:
    """Scale, in place, the W_qc/W_kc rows of heads with γ < 1 by sqrt(γ) and their W_qr rows by γ.

    q_b_weight: [H*(nope+rope), q_lora_rank], rows [nope | rope] per head.
    kv_b_weight: [H*(nope+v), kv_lora_rank], rows [k nope | value] per head.
    gamma_H: [H]. Returns the bool mask [H] of clipped heads (on gamma_H's device). Rows of heads
    with γ = 1 and all value rows are not written at all, so they stay bit-for-bit unchanged.
    """
    H = gamma_H.numel()
    if q_b_weight.shape[0] != H * (nope + rope):
        raise ValueError(
            f"q_b_proj weight has {q_b_weight.shape[0]} rows; expected heads*(nope+rope) = {H}*({nope}+{rope})."
        )
    if kv_b_weight.shape[0] != H * (nope + v):
        raise ValueError(
            f"kv_b_proj weight has {kv_b_weight.shape[0]} rows; expected heads*(nope+v) = {H}*({nope}+{v})."
        )
    clip_q_rows_(q_b_weight, gamma_H, nope, rope)
    clip_kv_rows_(kv_b_weight, gamma_H, nope, v)
    return gamma_H < 1


@torch.no_grad()
def clip_q_rows_(q_b_weight: Tensor, gamma_H: Tensor, nope: int, rope: int) -> None:
    """q_b_proj's half of QK-Clip: W_qc rows of clipped heads × sqrt(γ), W_qr rows × γ.

    The two halves are separate so that, with a sharded optimizer, the owner of each matrix
    clips its own master copy (docs/ARCHITECTURE.md#zero-1)."""
    heads, gamma = _clipped_heads(gamma_H, q_b_weight.device)
    if heads.numel():
        q_HRC = q_b_weight.view(gamma_H.numel(), nope + rope, -1)
        q_HRC[heads, :nope] = q_HRC[heads, :nope] * gamma.sqrt().to(q_HRC.dtype)
        q_HRC[heads, nope:] = q_HRC[heads, nope:] * gamma.to(q_HRC.dtype)


@torch.no_grad()
def clip_kv_rows_(kv_b_weight: Tensor, gamma_H: Tensor, nope: int, v: int) -> None:
    """kv_b_proj's half of QK-Clip: W_kc rows of clipped heads × sqrt(γ); value rows untouched."""
    heads, gamma = _clipped_heads(gamma_H, kv_b_weight.device)
    if heads.numel():
        kv_HRC = kv_b_weight.view(gamma_H.numel(), nope + v, -1)
        kv_HRC[heads, :nope] = kv_HRC[heads, :nope] * gamma.sqrt().to(kv_HRC.dtype)


def _clipped_heads(gamma_H: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    heads = (gamma_H < 1).nonzero().squeeze(1).to(device)
    return heads, gamma_H.to(device)[heads].view(-1, 1, 1)


def clip_attention_modules_(modules: Sequence[nn.Module], max_logits_LH: Tensor, tau: float) -> list[int]:
    """Apply QK-Clip to every MLA module (layer order) from the step's max logits [L, H].

    Each module provides `q_b_proj`, `kv_b_proj` (nn.Linear) and the ints `num_heads`,
    `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`. Returns the number of clipped heads per layer.
    """
    if max_logits_LH.ndim != 2 or max_logits_LH.shape[0] != len(modules):
        raise ValueError(
            f"QK-Clip got max logits of shape {tuple(max_logits_LH.shape)}; expected [{len(modules)} layers, heads]."
        )
    counts = []
    for layer, (attn, max_logits_H) in enumerate(zip(modules, max_logits_LH)):
        if max_logits_H.numel() != attn.num_heads:
            raise ValueError(
                f"QK-Clip got {max_logits_H.numel()} max logits for layer {layer}; expected {attn.num_heads} heads."
            )
        gamma_H = qk_clip_scales(max_logits_H, tau)
        clipped_H = apply_qk_clip_(
            attn.q_b_proj.weight, attn.kv_b_proj.weight, gamma_H,
            attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim,
        )
        counts.append(int(clipped_H.sum()))
    return counts

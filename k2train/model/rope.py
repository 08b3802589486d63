"""Rotary position embedding for MLA's decoupled rope dims, with optional YaRN (K2 §2.3, §2.5).

DeepSeek-style checkpoints (Kimi-K2 included) store the rope dims of q and k as interleaved pairs
(x0, x1), (x2, x3), ...; each pair is rotated by one frequency and the result is laid out as
[rotated evens, rotated odds], exactly as `transformers` does with `rope_interleave=True`, so weights
move between the two without permutation.
"""

from __future__ import annotations

import math

import torch

from k2train.config.schema import ModelConfig, YarnConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, theta: float, yarn: YarnConfig) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between (arXiv 2309.00071)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (yarn.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a degenerate ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] and the factor applied to cos/sin (1.0 unless YaRN sets one)."""
    dim = cfg.qk_rope_head_dim
    if cfg.yarn is None:
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
    y = cfg.yarn
    attention_factor = _yarn_mscale(y.factor, y.mscale) / _yarn_mscale(y.factor, y.mscale_all_dim)
    return _yarn_inv_freq(dim, cfg.rope_theta, y), attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-1/2, times YaRN's mscale² when YaRN is on (DeepSeek-V3 convention)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.yarn is not None and cfg.yarn.mscale_all_dim:
        scale *= _yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_factor: float, seq_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SF, sin_SF for positions 0..seq_len-1 (F = dr/2), computed in float32."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    angles_SF = positions[:, None] * inv_freq.float()[None, :]
    return (angles_SF.cos() * attention_factor).to(dtype), (angles_SF.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x[..., S, dr]; returns [rotated evens | rotated odds]."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([x_even * cos_SF - x_odd * sin_SF, x_odd * cos_SF + x_even * sin_SF], dim=-1)

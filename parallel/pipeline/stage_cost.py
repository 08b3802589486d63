"""The cost units the pipeline stages are balanced by: hardware FLOPs per token of each decoder
layer's forward and backward, and of the head with its loss (K2 §2.4: the pipeline's busiest rank
sets the pace). Counted from the model config by the same rules as MFU (k2train/train/flops.py),
plus what selective recomputation adds."""

from __future__ import annotations

from k2train.config.schema import ModelConfig
from k2train.train.flops import flops_per_token


def layer_flops(cfg: ModelConfig, seq: int, moe: bool, causal: bool) -> int:
    """Forward FLOPs per token of one decoder layer (k2train/train/flops.py, split per layer)."""
    f = flops_per_token(cfg, seq, causal=causal)
    attention = (f.attention_projections + f.attention_scores) // cfg.num_layers
    if moe:
        return attention + (f.router + f.routed_experts + f.shared_experts) // max(cfg.num_moe_layers, 1)
    return attention + f.dense_ffn // max(cfg.first_dense_layers, 1)


def recompute_flops(cfg: ModelConfig, moe: bool) -> int:
    """FLOPs per token that selective recomputation adds to a layer's backward: the MLA
    up-projections and the down-projections run again (norms and SwiGLU are elementwise)."""
    H = cfg.num_heads
    up = cfg.q_lora_rank * H * cfg.qk_head_dim + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    if moe:
        down = (cfg.experts_per_token + cfg.num_shared_experts) * cfg.moe_intermediate_size * cfg.hidden_size
    else:
        down = cfg.dense_intermediate_size * cfg.hidden_size
    return 2 * (up + down)


def stage_train_flops(cfg: ModelConfig, seq: int, layers: range, head: bool, recompute: bool, fused: bool) -> int:
    """Hardware FLOPs per token of one virtual stage's forward and backward (3x the forward, plus
    recomputation); eager attention computes the whole S x S square, a fused kernel the causal half."""
    total = 0
    for layer in layers:
        moe = layer >= cfg.first_dense_layers
        total += 3 * layer_flops(cfg, seq, moe, causal=fused) + (recompute_flops(cfg, moe) if recompute else 0)
    if head:
        total += 3 * 2 * cfg.hidden_size * cfg.vocab_size
    return total

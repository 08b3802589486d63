"""Model FLOPs per token, counted from the config (the numerator of MFU).

Only matrix products are counted (2 FLOPs per multiply-add); norms, RoPE, softmax, SiLU and the
routing's top-k are not, as in the usual MFU convention (PaLM, Megatron). Per token of a sequence
of S tokens, for each of the model's parts (K2 §2.3):

- MLA projections: q_a (D -> q_lora), q_b (q_lora -> H·(dn+dr)), kv_a (D -> kv_lora+dr),
  kv_b (kv_lora -> H·(dn+dv)), o (H·dv -> D);
- attention scores: q·kᵀ over (dn+dr) and probabilities·v over dv, against S keys per head;
  causal masking leaves on average half of them visible, so the causal count is half the S² term
  (the eager path computes the full square and masks it: `causal=False` counts what it computes);
- FFN: SwiGLU's three matrices, in the dense layers (dense_intermediate_size), and in the MoE
  layers for the router (D -> E), the top-k routed experts and the shared experts;
- the head (D -> vocab). The embedding is a lookup.
Backward costs twice the forward (a gradient for the input and one for the weight of every
product), so a training step is 3x the forward. Recomputation (memory.selective_recompute) adds
work that is not counted: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from k2train.config.schema import ModelConfig


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of each part of the model, summed over its layers."""

    attention_projections: int
    attention_scores: int
    dense_ffn: int
    router: int
    routed_experts: int
    shared_experts: int
    head: int

    @property
    def forward(self) -> int:
        return sum(asdict(self).values())

    @property
    def training(self) -> int:
        """Forward and backward: 3x the forward."""
        return 3 * self.forward

    def as_dict(self) -> dict[str, int]:
        return dict(asdict(self), forward=self.forward, training=self.training)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> FlopsPerToken:
    """Forward FLOPs per token of `cfg` on sequences of `seq_len` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len is {seq_len}, expected a positive number of tokens.")
    D, H = cfg.hidden_size, cfg.num_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    projections = (
        D * cfg.q_lora_rank
        + cfg.q_lora_rank * H * (dn + dr)
        + D * (cfg.kv_lora_rank + dr)
        + cfg.kv_lora_rank * H * (dn + dv)
        + H * dv * D
    )
    # Per query and head: S keys of (dn + dr) for the scores, S values of dv for the output.
    scores = H * seq_len * (dn + dr + dv)
    swiglu_moe = 3 * D * cfg.moe_intermediate_size
    layers, moe = cfg.num_layers, cfg.num_moe_layers
    return FlopsPerToken(
        attention_projections=2 * layers * projections,
        # 2 FLOPs per multiply-add; causal: half of the S keys are visible on average.
        attention_scores=layers * scores * (1 if causal else 2),
        dense_ffn=2 * cfg.first_dense_layers * 3 * D * cfg.dense_intermediate_size,
        router=2 * moe * D * cfg.num_experts,
        routed_experts=2 * moe * cfg.experts_per_token * swiglu_moe,
        shared_experts=2 * moe * cfg.num_shared_experts * swiglu_moe,
        head=2 * D * cfg.vocab_size,
    )

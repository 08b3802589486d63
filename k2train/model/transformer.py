"""The K2 decoder: embedding, pre-norm MLA + (dense | MoE) blocks, final norm, untied head.

The model is free of torch.distributed: pipeline and expert parallelism are applied to it from
`parallel/`. What waits for backward (FP8 storage, selective recomputation; K2 §2.4.3) is a frozen
`SavePolicy` given when the model is built and read by its modules. A block returns its statistics (per-head max logits, expert loads) next to its output
so a pipeline stage can collect them without hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from k2train.config.schema import ModelConfig
from k2train.memory.policy import SavePolicy
from k2train.model.attention import MLA
from k2train.model.ffn import SwiGLU
from k2train.model.init import normal_init_
from k2train.model.moe import MoE, update_router_bias_
from k2train.model.norm import RMSNorm
from k2train.model.rope import rope_cos_sin, rope_inv_freq, softmax_scale


@dataclass
class ModelOutput:
    output: torch.Tensor  # logits_BSV when the part has the head, else hidden states x_BSD
    max_logits_LH: torch.Tensor  # per layer of the part, per head: max pre-softmax logit (detached)
    expert_counts_ME: torch.Tensor  # per MoE layer of the part, per expert: tokens routed (int64)

    @property
    def logits_BSV(self) -> torch.Tensor:
        return self.output


@dataclass(frozen=True)
class ModelPart:
    """Which piece of the model a module holds: a pipeline stage's layers, whether it has the
    embedding and the head, and which routed experts (an expert-parallel rank's slice)."""

    layers: range
    embedding: bool = True
    head: bool = True
    first_expert: int = 0
    num_local_experts: int | None = None  # None: all experts

    @classmethod
    def whole(cls, cfg: ModelConfig) -> ModelPart:
        return cls(range(cfg.num_layers))


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)), FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, first_expert: int = 0, num_local_experts: int | None = None,
                 policy: SavePolicy = SavePolicy()):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy)
        self.self_attn = MLA(cfg, softmax_scale(cfg), policy)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy)
        self.is_moe = layer_idx >= cfg.first_dense_layers
        self.mlp = (
            MoE(cfg, first_expert, num_local_experts, policy)
            if self.is_moe
            else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, policy)
        )

    def forward(
        self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attn_BSD, max_logit_H = self.self_attn(self.input_layernorm(x_BSD), cos_SF, sin_SF)
        x_BSD = x_BSD + attn_BSD
        if self.is_moe:
            ffn_BSD, counts_E = self.mlp(self.post_attention_layernorm(x_BSD))
        else:
            ffn_BSD, counts_E = self.mlp(self.post_attention_layernorm(x_BSD)), None
        return x_BSD + ffn_BSD, max_logit_H, counts_E


class K2Model(nn.Module):
    """The K2 decoder, or one part of it (a pipeline stage, an expert slice).

    tokens_BS (or x_BSD for a part without the embedding) -> ModelOutput. Parameter names match
    DeepseekV3 without the `model.` prefix, also in a part (`layers.{i}` keeps the global index),
    and initial values depend only on (seed, name), so every layout starts from the same weights.

    `policy` (memory.fp8_activations, memory.selective_recompute; K2 §2.4.3): every SwiGLU (dense,
    shared expert) and the routed experts keep their up-projection and SwiGLU inputs for backward as
    FP8-E4M3 1x128 tiles; RMSNorms, SwiGLU with the down-projections and the MLA up-projections keep
    only their inputs and run again in backward. The default saves everything in the compute dtype.
    """

    def __init__(self, cfg: ModelConfig, part: ModelPart | None = None, seed: int = 0,
                 policy: SavePolicy = SavePolicy()):
        super().__init__()
        check_grouped_mm_alignment(cfg)
        self.cfg = cfg
        self.part = ModelPart.whole(cfg) if part is None else part
        self.seed = seed
        self.policy = policy
        p = self.part
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if p.embedding else None
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, i, p.first_expert, p.num_local_experts, policy) for i in p.layers}
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy) if p.head else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if p.head else None
        inv_freq, self.rope_attention_factor = rope_inv_freq(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) keyed by name for matrices and experts, ones for norms, zero router bias.
        Parameters on the meta device (shape-only models) are left alone."""
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            else:
                first_expert = self.part.first_expert if ".mlp.experts." in name else None
                normal_init_(param, name, self.seed, self.cfg.init_std, first_expert)
        for bias in self.router_biases():
            bias.zero_()

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x_BSD = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos_SF, sin_SF = rope_cos_sin(self.rope_inv_freq, self.rope_attention_factor, x.shape[1], x_BSD.dtype)
        max_logits, counts = [], []
        for block in self.layers.values():
            x_BSD, max_logit_H, counts_E = block(x_BSD, cos_SF, sin_SF)
            max_logits.append(max_logit_H)
            if counts_E is not None:
                counts.append(counts_E)
        out = self.lm_head(self.norm(x_BSD)) if self.lm_head is not None else x_BSD
        device = x_BSD.device
        max_logits_LH = torch.stack(max_logits) if max_logits else torch.zeros(0, self.cfg.num_heads, device=device)
        counts_ME = (
            torch.stack(counts) if counts else torch.zeros(0, self.cfg.num_experts, dtype=torch.int64, device=device)
        )
        return ModelOutput(out, max_logits_LH, counts_ME)

    def moe_layers(self) -> list[int]:
        """Global indices of this part's MoE layers, in order."""
        return [int(i) for i, block in self.layers.items() if block.is_moe]

    def attention_modules(self) -> Iterator[MLA]:
        """The MLA modules in layer order (QK-Clip's targets)."""
        return (block.self_attn for block in self.layers.values())

    def router_biases(self) -> list[torch.Tensor]:
        """The aux-loss-free selection biases of the MoE layers, in layer order."""
        return [block.mlp.gate.e_score_correction_bias for block in self.layers.values() if block.is_moe]

    def update_router_biases_(self, counts_ME: torch.Tensor, rate: float) -> None:
        """Apply the step's summed expert loads to every MoE layer's selection bias."""
        for bias_E, counts_E in zip(self.router_biases(), counts_ME, strict=True):
            update_router_bias_(bias_E, counts_E, rate)


def check_grouped_mm_alignment(cfg: ModelConfig) -> None:
    """torch._grouped_mm needs 16-byte aligned rows; refuse sizes it cannot run before building."""
    if cfg.expert_impl != "grouped_mm":
        return
    for key in ("hidden_size", "moe_intermediate_size"):
        value = getattr(cfg, key)
        if value % 8:
            raise ValueError(
                f"model.{key}={value} must be a multiple of 8 for model.expert_impl=grouped_mm "
                f"(torch._grouped_mm needs 16-byte aligned rows); use a multiple of 8 or expert_impl=loop."
            )


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated per token) parameter counts from the config alone, K2 counting convention.

    Activated counts every non-routed parameter plus experts_per_token routed experts per MoE layer.
    """
    D, H = cfg.hidden_size, cfg.num_heads
    attn = (
        D * cfg.q_lora_rank
        + cfg.q_lora_rank
        + cfg.q_lora_rank * H * cfg.qk_head_dim
        + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + H * cfg.v_head_dim * D
    )
    expert = 3 * D * cfg.moe_intermediate_size
    dense_ffn = 3 * D * cfg.dense_intermediate_size
    moe_fixed = cfg.num_experts * D + cfg.num_shared_experts * expert
    per_layer_fixed = attn + 2 * D
    embed_head = 2 * cfg.vocab_size * D + D
    total = (
        embed_head
        + cfg.num_layers * per_layer_fixed
        + cfg.first_dense_layers * dense_ffn
        + cfg.num_moe_layers * (moe_fixed + cfg.num_experts * expert)
    )
    active = total - cfg.num_moe_layers * (cfg.num_experts - cfg.experts_per_token) * expert
    return total, active


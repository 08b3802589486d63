"""The one mapping between this project's parameter names and the HF DeepseekV3 checkpoint layout.

Kimi-K2's released checkpoint (moonshotai/Kimi-K2-Instruct) uses per-expert tensors
(`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`); this project stores each layer's experts as
3-D tensors [E, out, in]. Every other name is the same up to the `model.` prefix.
"""

from __future__ import annotations

import re

import torch

from k2train.config.schema import ModelConfig

_EXPERT_STACK = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_EXPERT_SINGLE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_hf_name(name: str) -> str:
    """A non-expert name of ours -> its checkpoint name."""
    return name if name == "lm_head.weight" else f"model.{name}"


def from_hf_name(hf_name: str) -> str:
    """A non-expert checkpoint name -> ours."""
    return hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (parameters and router-bias buffers) -> checkpoint tensors, experts split."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _EXPERT_STACK.match(name)
        if match is None:
            out[to_hf_name(name)] = tensor
            continue
        layer, proj = match.groups()
        for j, expert in enumerate(tensor.unbind(0)):
            out[f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight"] = expert.contiguous()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict, stacking each layer's experts in expert order.

    Raises ValueError naming the first missing expert tensor, so a partial checkpoint never loads.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for hf_name, tensor in hf.items():
        match = _EXPERT_SINGLE.match(hf_name)
        if match is None:
            out[from_hf_name(hf_name)] = tensor
            continue
        layer, j, proj = match.groups()
        experts.setdefault((int(layer), proj), {})[int(j)] = tensor
    for (layer, proj), by_index in sorted(experts.items()):
        missing = [j for j in range(cfg.num_experts) if j not in by_index]
        if missing:
            raise ValueError(
                f"checkpoint lacks model.layers.{layer}.mlp.experts.{missing[0]}.{proj}.weight "
                f"(expected {cfg.num_experts} experts per MoE layer)."
            )
        out[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([by_index[j] for j in range(cfg.num_experts)])
    return out


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A DeepseekV3 `config.json` describing the same architecture (no MTP, no expert groups)."""
    rope_scaling = None
    if cfg.yarn is not None:
        rope_scaling = {
            "type": "yarn",
            "factor": cfg.yarn.factor,
            "original_max_position_embeddings": cfg.yarn.original_max_position_embeddings,
            "beta_fast": cfg.yarn.beta_fast,
            "beta_slow": cfg.yarn.beta_slow,
            "mscale": cfg.yarn.mscale,
            "mscale_all_dim": cfg.yarn.mscale_all_dim,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.first_dense_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": cfg.num_shared_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": (
            cfg.max_position_embeddings
            if cfg.yarn is None
            else int(cfg.yarn.original_max_position_embeddings * cfg.yarn.factor)
        ),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


_ITEM_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts\.(?:gate_proj|up_proj|down_proj))\[(\d+)\]$")
_ITEM_ROWS = re.compile(r"^(.+)\[rows (\d+):(\d+)\]$")


def hf_name_of_item(key: str) -> tuple[str, tuple[int, int] | None]:
    """An optimizer item key (`parallel/zero1/ownership.py`) -> (the checkpoint tensor holding it, its
    [start, stop) rows there, or None for the whole tensor).

    `layers.3.mlp.experts.up_proj[5]` -> model.layers.3.mlp.experts.5.up_proj.weight;
    `embed_tokens.weight[rows 0:2340]` -> (model.embed_tokens.weight, (0, 2340)).
    """
    expert = _ITEM_EXPERT.match(key)
    if expert is not None:
        stack, index = expert.groups()
        layer, proj = _EXPERT_STACK.match(stack).groups()
        return f"model.layers.{layer}.mlp.experts.{index}.{proj}.weight", None
    rows = _ITEM_ROWS.match(key)
    if rows is not None:
        return to_hf_name(rows.group(1)), (int(rows.group(2)), int(rows.group(3)))
    return to_hf_name(key), None

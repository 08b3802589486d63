"""Nothing silent: a HF `config.json` must describe the function of the model it is converted into.

Shapes are checked by the tensors themselves; the fields here change the function without
changing any shape (a checkpoint with rope theta 10,000 imported as a theta-50,000 model trains a
different model from step 1). Each is compared with what this project's model computes:

- rope: `rope_theta` and `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5,
  which nests the theta, the type and the YaRN values in one dict); YaRN's factor, original
  length, beta fast/slow, mscale and mscale_all_dim (K2 §2.5, YaRN after pre-training);
- norms and routing (K2 §2.3): rms_norm_eps, routed_scaling_factor, norm_topk_prob, router groups
  (n_group, topk_group), scoring_func, topk_method, hidden_act, attention bias, tied embeddings;
- quantisation: only FP8 E4M3 weights in 128 x 128 blocks (`parallel/checkpoint/hf_fp8.py`).

A field the file leaves out takes transformers' DeepseekV3 default, as `from_pretrained` would.
A mismatch is refused naming the field, both values and the file; `--set model.<field>=<value>`
makes this run's model the checkpoint's, and `--accept-hf-field <field>` converts into this
run's model deliberately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from k2train.config.schema import ModelConfig
from k2train.model.hf_names import hf_config_dict
from parallel.checkpoint.checkpointer import CheckpointError
from parallel.checkpoint.hf_fp8 import BLOCK

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim",
)
# Function-changing fields with transformers' DeepseekV3Config default (used when the file omits
# one) and the config key that sets ours (None: this project implements only the one value).
FUNCTION_FIELDS: dict[str, tuple[Any, str | None]] = {
    "rms_norm_eps": (1e-6, "model.rms_norm_eps"),
    "routed_scaling_factor": (2.5, "model.routed_scaling_factor"),
    "norm_topk_prob": (True, None),
    "n_group": (8, None),
    "topk_group": (4, None),
    "scoring_func": ("sigmoid", None),
    "topk_method": ("noaux_tc", None),
    "hidden_act": ("silu", None),
    "attention_bias": (False, None),
    "tie_word_embeddings": (False, None),
}
# YaRN values transformers falls back to when rope_scaling leaves one out.
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def hf_rope(config: dict) -> dict[str, tuple[str, Any]]:
    """The rope settings of a config.json, each as (the field as the file spells it, value)."""
    nested = config.get("rope_parameters")
    if isinstance(nested, dict):  # transformers 5
        where, params = "rope_parameters", nested
        theta = ("rope_parameters.rope_theta", nested.get("rope_theta", 10000.0))
    else:  # transformers 4
        where, params = "rope_scaling", config.get("rope_scaling") or {}
        theta = ("rope_theta", config.get("rope_theta", 10000.0))
    spelled = "type" if "type" in params and "rope_type" not in params else "rope_type"
    found = {"rope_theta": theta, "rope_type": (f"{where}.{spelled}", params.get(spelled, "default"))}
    if found["rope_type"][1] == "yarn":
        for field in YARN_FIELDS:
            found[field] = (f"{where}.{field}", params.get(field, YARN_DEFAULTS.get(field)))
    return found


def our_rope(cfg: ModelConfig) -> dict[str, tuple[str, Any]]:
    """The same settings of this project's model, each as (its config key, value)."""
    ours = {"rope_theta": ("model.rope_theta", cfg.rope_theta),
            "rope_type": ("model.yarn", "default" if cfg.yarn is None else "yarn")}
    if cfg.yarn is not None:
        ours |= {field: (f"model.yarn.{field}", getattr(cfg.yarn, field)) for field in YARN_FIELDS}
    return ours


def _differs(theirs: Any, ours: Any) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return theirs is None or ours is None or abs(float(theirs) - float(ours)) > 1e-9 * max(abs(float(ours)), 1e-30)
    return theirs != ours


def config_mismatches(config: dict, cfg: ModelConfig) -> list[tuple[str, Any, Any, str | None]]:
    """(field as spelled in the file, their value, ours, our config key, None, or "shape") for
    every shape- or function-changing field that differs, in a fixed order."""
    ours = hf_config_dict(cfg)
    found = [(key, config[key], ours[key], "shape") for key in SHAPE_FIELDS
             if key in config and config[key] != ours[key]]
    for key, (default, knob) in FUNCTION_FIELDS.items():
        if _differs(config.get(key, default), ours[key]):
            found.append((key, config.get(key, default), ours[key], knob))
    theirs_rope, ours_rope = hf_rope(config), our_rope(cfg)
    for key in ("rope_theta", "rope_type", *YARN_FIELDS):
        if key not in theirs_rope and key not in ours_rope:
            continue
        spelled, value = theirs_rope.get(key, (key, None))
        knob, mine = ours_rope.get(key, ("model.yarn", None))
        if _differs(value, mine):
            found.append((spelled, value, mine, knob))
    return found


def check_quantization(config: dict, path: Path) -> None:
    """Refuse any quantisation but FP8 E4M3 in 128 x 128 blocks with dequantisation scales."""
    quant = config.get("quantization_config")
    if quant is None:
        return
    fine = (quant.get("quant_method") == "fp8" and quant.get("fmt", "e4m3") == "e4m3"
            and list(quant.get("weight_block_size", [BLOCK, BLOCK])) == [BLOCK, BLOCK])
    if not fine:
        raise CheckpointError(f"{path} has quantization_config={json.dumps(quant)}, but k2train reads only "
                              f"quant_method fp8, fmt e4m3, weight_block_size [{BLOCK}, {BLOCK}].")


def check_hf_config(directory: Path, cfg: ModelConfig, accepted: tuple[str, ...] = ()) -> None:
    """Refuse a HF directory whose config.json describes another model, naming the first field
    that differs, both values and the file. Fields in `accepted` (as spelled in the file or
    without their `rope_scaling.` / `rope_parameters.` prefix) are converted deliberately."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; k2train compares it with the model config "
                              "before converting, so nothing changes the model silently.")
    config = json.loads(path.read_text())
    check_quantization(config, path)
    for spelled, theirs, ours, knob in config_mismatches(config, cfg):
        if knob == "shape":
            raise CheckpointError(f"{path} has {spelled}={theirs!r}, but the config describes {spelled}={ours!r}.")
        if spelled in accepted or spelled.split(".")[-1] in accepted:
            continue
        if knob is None:
            how = "k2train implements only this value; "
        elif knob == "model.yarn":
            how = "set model.yarn (as the file's rope scaling) with --set to convert the checkpoint's model, or "
        else:
            how = f"set {knob}={theirs!r} with --set to convert the checkpoint's model, or "
        raise CheckpointError(f"{path} has {spelled}={theirs!r}, but the config describes {ours!r}; {how}"
                              f"pass --accept-hf-field {spelled} to convert it into this config's model deliberately.")

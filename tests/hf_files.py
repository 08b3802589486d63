"""HF directories in the released Kimi-K2 format, built by tests (nothing is downloaded).

`write_k2_format` writes what `moonshotai/Kimi-K2-Base` ships, at any size: sharded
`model-0000i-of-0000N.safetensors`, `model.safetensors.index.json`, and a config.json with the
transformers-4 spelling and an FP8 `quantization_config`; every linear projection is
float8_e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block, and the embedding, head,
norms, router weight and router bias stay in their own dtypes, as in the release.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2train.model import K2Model
from k2train.model.hf_names import hf_config_dict, to_hf_state_dict
from parallel.checkpoint.hf_fp8 import BLOCK, quantize_fp8_block, scale_name


def is_fp8_in_release(name: str) -> bool:
    """Linear projections are FP8 in the release; embedding, head, norms and the router are not."""
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")


def k2_format_tensors(model: K2Model) -> dict[str, torch.Tensor]:
    """The model's tensors as the release stores them: FP8 projections with scales, bf16 else,
    the router bias in float32."""
    tensors = {}
    for name, tensor in to_hf_state_dict(model.state_dict()).items():
        if is_fp8_in_release(name):
            tensors[name], tensors[scale_name(name)] = quantize_fp8_block(tensor)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = tensor.float().contiguous()
        else:
            tensors[name] = tensor.to(torch.bfloat16).contiguous()
    return tensors


def k2_format_config(model: K2Model) -> dict:
    config = hf_config_dict(model.cfg)
    config.update(model_type="kimi_k2", torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]})
    return config


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int, config: dict) -> None:
    """Shards, index and config.json; a weight and its scale share a shard, as in the release."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n in tensors if not n.endswith("_scale_inv")]
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        shard = {}
        for name in names[i * per:(i + 1) * per]:
            shard[name] = tensors[name]
            if scale_name(name) in tensors:
                shard[scale_name(name)] = tensors[scale_name(name)]
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))


def write_k2_format(model: K2Model, directory: Path, shards: int = 3) -> dict[str, torch.Tensor]:
    """Write `model` in the released format; returns the tensors written."""
    tensors = k2_format_tensors(model)
    write_shards(tensors, directory, shards, k2_format_config(model))
    return tensors

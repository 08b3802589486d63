"""`k2train convert`: this project's checkpoints <-> HF safetensors in the DeepseekV3 layout of Kimi-K2.

Export reads the model tensors of a checkpoint (any layout: the keys are logical) into one whole
model and writes sharded `model-0000i-of-0000N.safetensors` files, `model.safetensors.index.json`
and a DeepseekV3 `config.json` that `transformers.DeepseekV3ForCausalLM.from_pretrained` loads.
Import reads safetensors (never a pickle) and writes a step-0 checkpoint holding the model only: a
run resumed from it starts the optimizer fresh from those weights. Names are mapped by
`k2train.model.hf_names`, the one place that knows both layouts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from k2train.config.load import load_config
from k2train.config.schema import JobConfig, ModelConfig
from k2train.model import K2Model
from k2train.model.hf_names import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from parallel.checkpoint import MANIFEST, CheckpointError, Checkpointer, latest_checkpoint, router_bias_key
from parallel.ownership import item_places

INDEX = "model.safetensors.index.json"


def model_views(model: K2Model, block_elements: int) -> dict[str, torch.Tensor]:
    """The checkpoint keys of a whole model, one per optimizer item as the trainer saves them
    (`parallel/ownership.py`): model/<name>, model/<name>[e] per expert, model/<name>[rows a:b] per
    row block of a large AdamW parameter (optimizer.adamw_block_elements); and buffer/<bias>."""
    named = list(model.named_parameters())
    views = {}
    for place in item_places(named, 0, block_elements):
        data = named[place.position][1].data
        views[f"model/{place.item.key}"] = data if place.part is None else data[place.part]
    for layer, bias in zip(model.moe_layers(), model.router_biases(), strict=True):
        views[router_bias_key(layer)] = bias
    return views


def load_whole_model(cfg: JobConfig, checkpoint: Path) -> K2Model:
    """One process holding the whole model, read from a checkpoint directory or a checkpoint root."""
    path = checkpoint if (checkpoint / MANIFEST).is_file() else latest_checkpoint(checkpoint)
    if path is None:
        raise CheckpointError(f"{checkpoint} holds no checkpoint ({MANIFEST} or a `latest` pointer).")
    model = K2Model(cfg.model, seed=cfg.train.seed).to(getattr(torch, cfg.train.param_dtype))
    views = model_views(model, cfg.optimizer.adamw_block_elements)
    Checkpointer(cfg, path.parent, rank=0, distributed=False).load(path, views)
    return model


def export_hf(model: K2Model, out: Path, shard_bytes: int = 4 << 30) -> list[Path]:
    """Write the model as sharded HF safetensors with an index and a DeepseekV3 config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict()).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = hf_config_dict(model.cfg)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return files


def read_hf(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF safetensors checkpoint (sharded with an index, or one model.safetensors)."""
    index = directory / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has neither {INDEX} nor model.safetensors.")
    tensors = {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is listed in {index} but missing.")
        with safe_open(str(directory / name), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


# The fields that decide tensor shapes and routing; others (dtype, init, rope) do not change what loads.
_ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


def check_hf_config(directory: Path, cfg: ModelConfig) -> None:
    """Refuse a HF checkpoint whose config.json describes another architecture, naming the field."""
    path = directory / "config.json"
    if not path.is_file():
        return
    theirs, ours = json.loads(path.read_text()), hf_config_dict(cfg)
    for key in _ARCHITECTURE_KEYS:
        if key in theirs and theirs[key] != ours[key]:
            raise CheckpointError(f"{path} has {key}={theirs[key]!r}, but the config describes {key}={ours[key]!r}.")


def import_hf(cfg: JobConfig, directory: Path, out: Path) -> Path:
    """Write a step-0 checkpoint (model only) from HF safetensors; returns its directory."""
    check_hf_config(directory, cfg.model)
    model = K2Model(cfg.model, seed=cfg.train.seed)
    state = from_hf_state_dict(read_hf(directory), cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Layers past num_layers are multi-token-prediction modules (DeepSeek-V3 ships one); K2 has none.
    unexpected = [k for k in unexpected if not k.startswith("layers.") or int(k.split(".")[1]) < cfg.model.num_layers]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"{directory} does not fit the config: {'missing' if missing else 'unexpected'} {first}.")
    model.to(getattr(torch, cfg.train.param_dtype))
    checkpointer = Checkpointer(cfg, out, rank=0, distributed=False)
    checkpointer.lineage = {}  # imported weights: the first run that trains them starts the lineage
    checkpointer.save(0, model_views(model, cfg.optimizer.adamw_block_elements), sampler={},
                      layout={"world_size": 1, "source": str(directory)})
    checkpointer.wait()
    return latest_checkpoint(out)


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    convert = subparsers.add_parser("convert", help="convert between k2train checkpoints and HF safetensors")
    convert.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config (its model section)")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-checkpoint", type=Path, metavar="DIR", help="a checkpoint directory or root")
    source.add_argument("--from-hf", type=Path, metavar="DIR", help="a HF DeepseekV3 safetensors directory")
    convert.add_argument("--trust-checkpoint", action="store_true",
                         help="read a checkpoint without dcp_metadata.json through its pickled .metadata (runs code)")
    convert.add_argument("--out", required=True, type=Path, metavar="DIR",
                         help="HF directory (from a checkpoint) or checkpoint root (from HF)")
    convert.set_defaults(func=run_convert)
    return convert


def run_convert(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.set, *(["checkpoint.trust_pickle_metadata=true"] if args.trust_checkpoint else [])])
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CheckpointError(f"--out {args.out} is not an empty directory; convert writes only into a new or "
                              "empty one, so no checkpoint or export is overwritten or mixed with another.")
    if args.from_checkpoint is not None:
        files = export_hf(load_whole_model(cfg, args.from_checkpoint), args.out)
        print(f"wrote {len(files)} safetensors file(s), {INDEX} and config.json to {args.out}")
    else:
        path = import_hf(cfg, args.from_hf, args.out)
        print(f"wrote checkpoint {path}; train with --set checkpoint.dir={args.out} to start from it")
    return 0

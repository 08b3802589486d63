"""`k2train convert`: this project's checkpoints <-> HF safetensors in the DeepseekV3 layout of Kimi-K2.

Both directions stream, tensor by tensor, so memory does not grow with the model (a 1T model
converts on ordinary hosts). Export (`parallel/checkpoint/hf_export.py`) reads the model tensors of a
checkpoint (any layout: the keys are logical) and writes sharded `model-0000i-of-0000N.safetensors`
files, `model.safetensors.index.json` and a DeepseekV3 `config.json` that
`transformers.DeepseekV3ForCausalLM.from_pretrained` loads. Import (`parallel/checkpoint/hf_import.py`)
reads safetensors (never a pickle; bf16/fp16/fp32, or the released FP8 block weights with their
scales) and writes a step-0 checkpoint holding the model only: a run resumed from it starts the
optimizer fresh from those weights. Under torchrun or Slurm every rank imports the keys it owns
under the config's layout. The HF config.json is compared field by field first
(`parallel/checkpoint/hf_config.py`). Names are mapped by `k2train.model.hf_names`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from k2train.config.load import load_config
from k2train.config.schema import JobConfig
from k2train.model import K2Model
from parallel.checkpoint.checkpointer import MANIFEST, CheckpointError, Checkpointer, latest_checkpoint, router_bias_key
from parallel.checkpoint.hf_export import INDEX, export_hf
from parallel.checkpoint.hf_import import import_hf
from parallel.zero1.ownership import item_places
from parallel.state import init_parallel, launch_env
from parallel.layout import layout_for


def model_views(model: K2Model, block_elements: int) -> dict[str, torch.Tensor]:
    """The checkpoint keys of a whole model, one per optimizer item as the trainer saves them
    (`parallel/zero1/ownership.py`): model/<name>, model/<name>[e] per expert, model/<name>[rows a:b] per
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
    convert.add_argument("--accept-hf-field", action="append", default=[], metavar="FIELD",
                         help="convert although the HF config.json's FIELD differs from the config (repeatable)")
    convert.add_argument("--working-set-mb", type=float, default=256.0, metavar="MB",
                         help="export: most tensor bytes read from the checkpoint at once (default 256)")
    convert.add_argument("--shard-mb", type=float, default=4096.0, metavar="MB",
                         help="export: bytes per safetensors file (default 4096)")
    convert.set_defaults(func=run_convert)
    return convert


def run_convert(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.set, *(["checkpoint.trust_pickle_metadata=true"] if args.trust_checkpoint else [])])
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CheckpointError(f"--out {args.out} is not an empty directory; convert writes only into a new or "
                              "empty one, so no checkpoint or export is overwritten or mixed with another.")
    if args.from_checkpoint is not None:
        files = export_hf(cfg, args.from_checkpoint, args.out, shard_bytes=int(args.shard_mb * 2**20),
                          working_set_bytes=int(args.working_set_mb * 2**20))
        print(f"wrote {len(files)} safetensors file(s), {INDEX} and config.json to {args.out}")
        return 0
    env = launch_env()
    accepted = tuple(args.accept_hf_field)
    if env.world_size == 1:
        path = import_hf(cfg, args.from_hf, args.out, accepted=accepted)
    else:
        # Every rank of the launched layout writes the keys it owns (parallel/checkpoint/hf_import.py).
        layout = layout_for(cfg, env.world_size)
        init_parallel(layout, env, torch.device("cpu"))
        try:
            path = import_hf(cfg, args.from_hf, args.out, rank=env.rank, layout=layout, accepted=accepted)
        finally:
            dist.destroy_process_group()
        if env.rank != 0:
            return 0
    print(f"wrote checkpoint {path}; train with --set checkpoint.dir={args.out} to start from it")
    return 0

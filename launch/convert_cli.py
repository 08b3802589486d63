"""The `k2train convert` command: this project's checkpoints <-> HF safetensors (the conversion
itself, and torch, are imported when it runs: parallel/checkpoint/convert.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert --config FILE (--from-checkpoint DIR | --from-hf DIR) --out DIR [...]`."""
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
    """Export a checkpoint to HF, or import HF as a step-0 checkpoint (every rank of a launch its keys)."""
    from k2train.config.load import load_config
    from launch.env import launch_env
    from parallel.checkpoint.checkpointer import CheckpointError
    from parallel.checkpoint.convert import import_checkpoint
    from parallel.checkpoint.hf_export import INDEX, export_hf

    cfg = load_config(args.config, [*args.set, *(["checkpoint.trust_pickle_metadata=true"] if args.trust_checkpoint else [])])
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CheckpointError(f"--out {args.out} is not an empty directory; convert writes only into a new or "
                              "empty one, so no checkpoint or export is overwritten or mixed with another.")
    if args.from_checkpoint is not None:
        files = export_hf(cfg, args.from_checkpoint, args.out, shard_bytes=int(args.shard_mb * 2**20),
                          working_set_bytes=int(args.working_set_mb * 2**20))
        print(f"wrote {len(files)} safetensors file(s), {INDEX} and config.json to {args.out}")
        return 0
    path = import_checkpoint(cfg, args.from_hf, args.out, launch_env(), accepted=tuple(args.accept_hf_field))
    if path is not None:  # rank 0 (or the one process) tells where the checkpoint is
        print(f"wrote checkpoint {path}; train with --set checkpoint.dir={args.out} to start from it")
    return 0

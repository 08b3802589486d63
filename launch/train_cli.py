"""The `k2train train` command; the trainer (and torch) is imported when it runs, so registering
the command costs nothing (parallel/trainer.py does the work)."""

from __future__ import annotations

import argparse


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train --config FILE [--set K=V] [--trust-checkpoint]`."""
    train = subparsers.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, metavar="FILE", help="a YAML job config, e.g. configs/k2_tiny.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    train.add_argument(
        "--trust-checkpoint", action="store_true",
        help="resume a checkpoint without dcp_metadata.json by unpickling its .metadata (runs code it holds)",
    )
    train.set_defaults(func=run_train)
    return train


def run_train(args: argparse.Namespace) -> int:
    """Train the config as this process's rank of the launch (torchrun's or Slurm's variables)."""
    from k2train.config.load import load_config
    from launch.env import launch_env
    from launch.job import exit_code
    from parallel.trainer import run_training

    trust = ["checkpoint.trust_pickle_metadata=true"] if args.trust_checkpoint else []
    cfg = load_config(args.config, [*args.set, *trust])
    return exit_code(lambda: run_training(cfg, launch_env()))

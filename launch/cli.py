"""The `k2train` command line: `train`, `data`, `layout`, `optimizer-plan` and `convert` subcommands.

`k2train train` runs as one process or as each rank of a torchrun / Slurm launch.
"""

from __future__ import annotations

import argparse
import sys

from k2train.config.checks import ConfigError
from k2train.data.errors import DataError
from k2train.data.prepare import add_data_parser
from parallel.checkpoint.checkpointer import CheckpointError
from parallel.checkpoint.convert import add_convert_parser
from parallel.layout import LayoutError
from parallel.plan.layout_report import add_layout_parser
from parallel.plan.optimizer import add_optimizer_plan_parser
from parallel.plan.report import add_plan_parser
from launch.profile_cli import add_profile_parser


def _run_train(args: argparse.Namespace) -> int:
    from k2train.config.load import load_config
    from parallel.trainer import exit_code, run_training

    trust = ["checkpoint.trust_pickle_metadata=true"] if args.trust_checkpoint else []
    cfg = load_config(args.config, [*args.set, *trust])
    return exit_code(lambda: run_training(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2train", description="Train Kimi-K2-architecture MoE models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, metavar="FILE", help="a YAML job config, e.g. configs/k2_tiny.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    train.add_argument(
        "--trust-checkpoint", action="store_true",
        help="resume a checkpoint without dcp_metadata.json by unpickling its .metadata (runs code it holds)",
    )
    train.set_defaults(func=_run_train)
    add_data_parser(commands)
    add_layout_parser(commands)
    add_optimizer_plan_parser(commands)
    add_plan_parser(commands)
    add_convert_parser(commands)
    add_profile_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, LayoutError, CheckpointError, NotImplementedError, FileExistsError, FileNotFoundError) as err:
        # Errors meant for people: one sentence, no traceback.
        print(f"k2train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

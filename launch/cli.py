"""The `k2train` command line: `train`, `data`, `layout`, `optimizer-plan`, `plan`, `convert` and
`profile` subcommands, one module each in launch/ (*_cli.py).

`k2train train` runs as one process or as each rank of a torchrun / Slurm launch. Building the
parser imports no torch: each command imports the library when it runs, so `k2train --help` is quick.
"""

from __future__ import annotations

import argparse
import sys

from launch.convert_cli import add_convert_parser
from launch.data_cli import add_data_parser
from launch.layout_cli import add_layout_parser
from launch.optimizer_plan_cli import add_optimizer_plan_parser
from launch.plan_cli import add_plan_parser
from launch.profile_cli import add_profile_parser
from launch.train_cli import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2train", description="Train Kimi-K2-architecture MoE models.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parser(commands)
    add_data_parser(commands)
    add_layout_parser(commands)
    add_optimizer_plan_parser(commands)
    add_plan_parser(commands)
    add_convert_parser(commands)
    add_profile_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from k2train.config.checks import ConfigError
    from k2train.data.errors import DataError
    from parallel.checkpoint.metadata import CheckpointError
    from parallel.layout import LayoutError

    try:
        return args.func(args)
    except (ConfigError, DataError, LayoutError, CheckpointError, NotImplementedError, FileExistsError, FileNotFoundError) as err:
        # Errors meant for people: one sentence, no traceback.
        print(f"k2train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `k2train layout` command, and the arguments it shares with `plan` and `optimizer-plan`: a
config described on a world it is not running on (parallel/plan/layout_report.py writes the text).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from launch.arguments import at_least_one

if TYPE_CHECKING:
    from k2train.config.schema import JobConfig

_positive_int = at_least_one(lambda text: f"expected a whole number of at least 1, got {text!r}")


def add_layout_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `layout --config FILE [--set K=V] (--nodes N | --world-size N) [--ranks R,R]`."""
    layout = subparsers.add_parser(
        "layout", help="print the PP x EP x DP layout of a config on a given number of nodes or ranks")
    add_world_arguments(layout)
    layout.add_argument("--params", action="store_true",
                        help="also build the chosen ranks' model parts on the meta device and count their parameters")
    layout.set_defaults(func=run_layout)
    return layout


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE [--set K=V]... (--nodes N | --world-size N) [--ranks R,R]`, shared by the
    commands that describe a config on a world it is not running on."""
    parser.add_argument("--config", required=True, metavar="FILE", help="a YAML job config, e.g. configs/k2_1t.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set parallel.rank_order=pp,ep,dp (repeatable)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--nodes", type=_positive_int, metavar="N", help="nodes of parallel.gpus_per_node GPUs each")
    size.add_argument("--world-size", type=_positive_int, metavar="N", help="ranks in all")
    parser.add_argument("--ranks", type=_rank_list, metavar="R,R,...",
                        help="ranks to describe, e.g. 0,17,255 (default: 0 and a few representative ones)")


def config_and_world(args: argparse.Namespace) -> tuple[JobConfig, int, str]:
    """The config of `add_world_arguments`, the world size asked for, and a source for messages."""
    from k2train.config.load import load_config

    cfg = load_config(args.config, args.set)
    world = args.world_size if args.world_size is not None else args.nodes * cfg.parallel.gpus_per_node
    sets = "".join(f" --set {s}" for s in args.set)
    size = f"--world-size {world}" if args.world_size is not None else f"--nodes {args.nodes} ({world} ranks)"
    return cfg, world, f"{args.config}{sets} with {size}"


def run_layout(args: argparse.Namespace) -> int:
    """Load the config, build its layout on the requested world and print the report."""
    from k2train.config.checks import validate_world
    from parallel.layout import LayoutError, config_layout
    from parallel.pipeline.split import SplitError, choose_split, describe_split
    from parallel.plan.layout_report import describe_layout, representative_ranks

    cfg, world, source = config_and_world(args)
    dp = validate_world(cfg, world, source)
    try:
        layout = config_layout(cfg, world, dp)
        report = describe_layout(layout, args.ranks)
        split = describe_split(choose_split(cfg, layout.num_stages, layout.pp), layout.pp)
    except (LayoutError, SplitError) as err:
        # Same form as the main CLI's errors for people: one sentence, no traceback.
        print(f"k2train: error: {source}: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"Layers of the {layout.num_stages} virtual stages (parallel/pipeline/split.py):")
    print(split)
    if args.params:
        from parallel.plan.params import describe_params  # imports torch and the model: only when asked

        print()
        print(describe_params(cfg, layout, args.ranks or representative_ranks(layout)))
    return 0


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        ranks = [-1]
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(
            f"expected ranks as comma-separated whole numbers, e.g. 0,17,255, got {text!r}")
    return ranks

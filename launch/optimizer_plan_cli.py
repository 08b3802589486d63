"""The `k2train optimizer-plan` command: the ZeRO-1 MuonClip ownership of a config's optimizer state
on a number of nodes (parallel/plan/optimizer.py builds the plan and writes its text)."""

from __future__ import annotations

import argparse
import sys

from launch.layout_cli import add_world_arguments, config_and_world


def add_optimizer_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `optimizer-plan --config FILE [--set K=V] (--nodes N | --world-size N) [--ranks R,R]`."""
    plan = subparsers.add_parser(
        "optimizer-plan",
        help="print the ZeRO-1 MuonClip ownership of a config's optimizer state on a given number of nodes")
    add_world_arguments(plan)
    plan.set_defaults(func=run_optimizer_plan)
    return plan


def run_optimizer_plan(args: argparse.Namespace) -> int:
    """Load the config, lay it out on the requested world, assign owners and print the plan."""
    from k2train.config.checks import resolve_dp
    from parallel.layout import LayoutError, config_layout
    from parallel.plan.layout_report import representative_ranks
    from parallel.plan.optimizer import build_plan, describe_plan

    cfg, world, source = config_and_world(args)
    dp = resolve_dp(cfg.parallel, world, source)  # a world the layout cannot fill stops here, naming the source
    try:
        layout = config_layout(cfg, world, dp)
        ranks = representative_ranks(layout) if args.ranks is None else args.ranks
        for rank in ranks:
            layout.coords(rank)  # a rank outside the world stops here, before the parts are built
        report = describe_plan(build_plan(cfg, layout), ranks)
    except LayoutError as err:
        # Same form as the main CLI's errors for people: one sentence, no traceback.
        print(f"k2train: error: {source}: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0

"""The `k2train plan` command: memory per GPU, communication and step time of a config on a number
of nodes of a hardware preset (parallel/plan/planner.py makes the plan, parallel/plan/report.py
writes its text)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from launch.layout_cli import add_world_arguments, config_and_world
from parallel.plan.activations import ATTENTION_KINDS
from parallel.plan.cost import HARDWARE, Hardware


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan --config FILE [--set K=V] (--nodes N | --world-size N) [--hardware NAME] [...]`."""
    plan = subparsers.add_parser(
        "plan", help="memory per GPU, communication and step time of a config on a number of nodes")
    add_world_arguments(plan)
    plan.add_argument("--hardware", choices=sorted(HARDWARE), default="h800", help="node preset (default h800)")
    plan.add_argument("--attention", choices=ATTENTION_KINDS,
                      help="eager or fused (default: fused on cuda, eager on cpu, as the model runs)")
    for field, help_text in (("gpu_memory_gib", "GiB per GPU"), ("peak_tflops", "BF16 TFLOP/s per GPU"),
                             ("nvlink_gbs", "GB/s per GPU inside a node"), ("network_gbs", "GB/s per GPU across nodes"),
                             ("pcie_gbs", "GB/s host<->device per GPU"), ("host_memory_gib", "GiB of host memory per node"),
                             ("reserved_gib", "GiB per GPU kept for CUDA/NCCL"),
                             ("efficiency", "fraction of peak reached by compute")):
        plan.add_argument(f"--{field.replace('_', '-')}", type=float, metavar="X", help=f"override the preset: {help_text}")
    plan.set_defaults(func=run_plan)
    return plan


def hardware_from(args: argparse.Namespace) -> Hardware:
    """The `--hardware` preset with the fields given on the command line replaced."""
    hw = HARDWARE[args.hardware]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Hardware)
               if getattr(args, f.name, None) is not None}
    for name, value in changes.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    return dataclasses.replace(hw, **changes)


def run_plan(args: argparse.Namespace) -> int:
    """Load the config, lay it out on the requested world, make the plan and print it."""
    from k2train.config.checks import validate_world
    from parallel.layout import LayoutError, config_layout
    from parallel.plan.planner import make_plan
    from parallel.plan.report import describe_plan

    cfg, world, source = config_and_world(args)
    dp = validate_world(cfg, world, source)
    try:
        hw = hardware_from(args)
        layout = config_layout(cfg, world, dp)
        wanted = None if args.ranks is None else sorted({layout.coords(rank).pp for rank in args.ranks})
        report = describe_plan(make_plan(cfg, layout, hw, args.attention), wanted)
    except (LayoutError, ValueError) as err:
        print(f"k2train: error: {source}: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0

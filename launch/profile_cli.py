"""The `k2train profile` command line; the profile itself (and torch) is imported when it runs,
so registering the command costs nothing (parallel/profiling/run.py does the work)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from launch.arguments import at_least_one

if TYPE_CHECKING:
    from k2train.config.schema import JobConfig
    from parallel.profiling.run import ProfileOptions

_at_least_one = at_least_one(lambda text: f"{text!r} is not a whole number of steps of at least 1")


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `profile --config FILE [--set K=V] [--warmup N] [--steps M] [--out DIR] [--peak-tflops X]`."""
    profile = subparsers.add_parser(
        "profile", help="time a config's training steps on its layout: tokens/s, MFU, time per rank, "
                        "memory per stage, a torch trace and the executed pipeline timeline")
    profile.add_argument("--config", required=True, metavar="FILE", help="a YAML job config, e.g. configs/k2_tiny.yaml")
    profile.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set train.micro_batch_size=4 (repeatable)")
    profile.add_argument("--warmup", type=_at_least_one, default=2, metavar="N", help="untimed steps first (default 2)")
    profile.add_argument("--steps", type=_at_least_one, default=5, metavar="M", help="measured steps (default 5)")
    profile.add_argument("--out", metavar="DIR", help="output directory (default: <logging.run_root>/profile-<config>-<time>)")
    profile.add_argument("--peak-tflops", type=_positive_float, metavar="X",
                         help="peak dense TFLOP/s of one device for MFU (default: known GPUs; none on CPU)")
    profile.add_argument("--torch-trace", action=argparse.BooleanOptionalAction, default=True,
                         help="run one more step under torch.profiler and write its chrome trace per rank")
    profile.set_defaults(func=_run_profile_command)
    return profile


def _run_profile_command(args: argparse.Namespace) -> int:
    from k2train.config.load import load_config
    from launch.job import exit_code
    from parallel.profiling.run import ProfileOptions

    cfg = load_config(args.config, args.set)
    options = ProfileOptions(args.warmup, args.steps, args.out, args.peak_tflops, args.torch_trace)
    return exit_code(lambda: _profile_and_print(cfg, options))


def _profile_and_print(cfg: JobConfig, options: ProfileOptions) -> None:
    """Profile this rank of the launch; rank 0 prints the summary it wrote to summary.txt."""
    from launch.env import launch_env
    from parallel.profiling.report import format_summary
    from parallel.profiling.run import run_profile

    report = run_profile(cfg, options, launch_env())
    if report is not None:
        print(format_summary(report))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value

"""Tokens/s of the tiny K2 config on this machine: one process (grouped-mm experts beside the
per-expert loop) and its own 8-process layout (pp 2 x vp 2 x ep 2 x dp 2 on gloo).

Not a test: `make bench` prints numbers for comparisons across commits. The runs alternate within
one invocation (A B C A B C ...) so a busy machine slows all alike; compare ratios, not absolute
figures, between machines. On a machine with fewer cores than processes the 8-process figure
measures the layout's overheads (pipeline bubble, all-to-all, gradient reduction), not a speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from k2train.config.load import load_config
from k2train.train.metrics import read_metrics
from parallel.trainer import run_training
from launch.env import launch_env

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "k2_tiny.yaml"
QUIET = ["logging.wandb=false", "logging.plots=false", "logging.progress_bar=false"]
ONE_PROCESS = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"]


def _rates(run_dir: Path) -> list[float]:
    _, records = read_metrics(run_dir / "metrics.jsonl")
    return [r["tokens_per_s"] for r in records[2:]]  # the first steps include warm-up


def one_process(impl: str, steps: int, root: str, name: str) -> list[float]:
    overrides = [*ONE_PROCESS, *QUIET, f"train.steps={steps}", f"model.expert_impl={impl}",
                 f"logging.run_root={root}", f"logging.run_name={name}"]
    with contextlib.redirect_stdout(io.StringIO()):  # the run's config dump and summary
        result = run_training(load_config(CONFIG, overrides), launch_env())
    return _rates(result.run_dir)


def eight_processes(steps: int, root: str, name: str) -> list[float]:
    overrides = [*QUIET, f"train.steps={steps}", f"logging.run_root={root}", f"logging.run_name={name}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
               "-m", "k2train", "train", "--config", str(CONFIG)]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return _rates(Path(root) / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"1 process, grouped_mm": [], "1 process, loop": [], "8 processes": []}
    with tempfile.TemporaryDirectory() as root:
        for index in range(args.rounds):
            samples["1 process, grouped_mm"] += one_process("grouped_mm", args.steps, root, f"g{index}")
            samples["1 process, loop"] += one_process("loop", args.steps, root, f"l{index}")
            samples["8 processes"] += eight_processes(args.steps, root, f"p{index}")
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\nk2_tiny throughput, {args.rounds} rounds x {args.steps} steps per run (median over steps 3+):")
    for name, value in median.items():
        print(f"  {name:<24} {value:10.0f} tokens/s")
    base = median["1 process, grouped_mm"]
    print(f"  grouped_mm / loop experts:     {base / median['1 process, loop']:.2f}x")
    print(f"  8 processes / 1 process:       {median['8 processes'] / base:.2f}x")


if __name__ == "__main__":
    main()

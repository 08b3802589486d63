"""Tokens/s of the tiny K2 config on this machine, grouped-mm experts beside the per-expert loop.

Not a test: `make bench` prints numbers for comparisons across commits. The two expert paths run
alternately in one invocation (A B A B ...) so a busy machine slows both alike; compare the ratio,
not the absolute figures, between machines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

from k2train.config.load import load_config
from k2train.train.loop import train
from k2train.train.metrics import read_metrics

CONFIG = Path(__file__).parents[2] / "configs" / "k2_tiny.yaml"


def run_once(impl: str, steps: int, root: str, index: int) -> list[float]:
    cfg = load_config(
        CONFIG,
        [
            f"train.steps={steps}", f"model.expert_impl={impl}", f"logging.run_root={root}",
            f"logging.run_name=bench-{impl}-{index}", "logging.wandb=false", "logging.plots=false",
            "logging.progress_bar=false",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the run's config dump and summary
        result = train(cfg)
    _, records = read_metrics(result.run_dir / "metrics.jsonl")
    return [r["tokens_per_s"] for r in records[2:]]  # the first steps include warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"grouped_mm": [], "loop": []}
    with tempfile.TemporaryDirectory() as root:
        for index in range(args.rounds):
            for impl in samples:
                samples[impl] += run_once(impl, args.steps, root, index)
    median = {impl: statistics.median(values) for impl, values in samples.items()}
    print(f"\nk2_tiny throughput, {args.rounds} rounds x {args.steps} steps per expert path (median over steps 3+):")
    for impl, value in median.items():
        print(f"  experts={impl:<10} {value:10.0f} tokens/s")
    print(f"  grouped_mm / loop: {median['grouped_mm'] / median['loop']:.2f}x")


if __name__ == "__main__":
    main()

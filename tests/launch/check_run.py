"""Check the run directory a launched training left behind, and print one line about it.

    python tests/launch/check_run.py RUN_DIR --world-size 4 --steps 5 [--same-losses OTHER_RUN_DIR]

Passes when metrics.jsonl has the run header of the expected world, one step record per step with
a finite loss, a first loss near ln(vocab) (an untrained model over the tokenizer's ids), and a
last loss below the first. With --same-losses the losses must equal another run's step by step
(the same config and seed on the same layout train identically however the ranks were started).
Standard library only, so it runs with any Python.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_run(run_dir: Path) -> tuple[dict, list[float]]:
    """The header record and the per-step losses of `run_dir`/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"check-run: {path} does not exist; the training wrote no metrics.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or records[0].get("kind") != "run":
        raise SystemExit(f"check-run: {path} does not start with the run header.")
    losses = [float(r["loss"]) for r in records[1:] if r.get("kind") == "step"]
    return records[0], losses


def check(run_dir: Path, world_size: int, steps: int, vocab: int) -> tuple[dict, list[float]]:
    header, losses = read_run(run_dir)
    problems = []
    if header.get("world_size") != world_size:
        problems.append(f"world_size {header.get('world_size')}, expected {world_size}")
    if len(losses) != steps:
        problems.append(f"{len(losses)} step records, expected {steps}")
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite losses {losses}")
    elif losses:
        if abs(losses[0] - math.log(vocab)) > 1.0:
            problems.append(f"first loss {losses[0]:.4f}, expected near ln({vocab}) = {math.log(vocab):.4f}")
        if losses[-1] >= losses[0]:
            problems.append(f"loss did not fall: {losses}")
    if problems:
        raise SystemExit(f"check-run: {run_dir}: " + "; ".join(problems) + ".")
    return header, losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=512, help="the model's vocab_size (k2_tiny: 512)")
    parser.add_argument("--same-losses", type=Path, metavar="OTHER_RUN_DIR")
    args = parser.parse_args()
    header, losses = check(args.run_dir, args.world_size, args.steps, args.vocab)
    if args.same_losses is not None:
        _, other = read_run(args.same_losses)
        if other != losses:
            raise SystemExit(f"check-run: losses differ from {args.same_losses}: {losses} vs {other}.")
    layout = " x ".join(f"{k} {header[k]}" for k in ("pp", "vp", "ep", "dp"))
    print(f"world {header['world_size']} ({layout}), {len(losses)} steps, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

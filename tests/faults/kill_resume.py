"""A rank killed with SIGKILL mid-run: torchrun restarts the job, it resumes from the last
checkpoint and finishes with the parameters of an uninterrupted run (bit for bit, float32, gloo).

Not part of `make test` (it takes about a minute); `make fault-test` runs it and CI runs that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).parents[2]
STEPS, EVERY, KILL_AT = 24, 4, 8
LAYOUT = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=2", "parallel.dp=null"]  # 4 processes


def command(tmp: Path, name: str, restarts: int) -> list[str]:
    overrides = [*LAYOUT, f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
                 f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.run_root={tmp / name / 'runs'}",
                 "logging.wandb=false", "logging.plots=false", "logging.progress_bar=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--max-restarts", str(restarts), "-m", "k2train", "train", "--config", str(ROOT / "configs" / "k2_tiny.yaml")]
    return cmd + [arg for o in overrides for arg in ("--set", o)]


def workers_of(parent: int) -> list[int]:
    """PIDs of the processes started by `parent` (torchrun's agent starts the workers)."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=", "-e"], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [parent]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def final_tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{ckpt.parent.name}.pt"
    dcp_to_torch_save(str(ckpt / f"step_{STEPS:08d}"), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if not k.startswith("rng/")}


def start_until_checkpoint(tmp: Path, name: str, restarts: int, step: int) -> subprocess.Popen | None:
    """An uninterrupted run into tmp/whole, then job `name` started and watched until its step-`step`
    checkpoint exists; None (with its output printed) when it ends or stalls before."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command(tmp, "whole", 0), check=True, env=env, capture_output=True)
    job = subprocess.Popen(command(tmp, name, restarts), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    target = tmp / name / "ckpt" / f"step_{step:08d}"
    deadline = time.time() + 300
    while not target.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if job.poll() is not None or not target.exists():
        print(job.stdout.read())
        print(f"FAIL: the job ended or stalled before its step-{step} checkpoint; nothing was done to it")
        return None
    return job


def compare_with_whole(tmp: Path, name: str, what: str) -> int:
    """0 when job `name`'s final checkpoint equals the uninterrupted run's bit for bit, else 1."""
    whole, other = final_tensors(tmp / "whole" / "ckpt", tmp), final_tensors(tmp / name / "ckpt", tmp)
    different = [k for k in whole if not torch.equal(whole[k], other[k])]
    if whole.keys() != other.keys() or different:
        print(f"FAIL: final state differs from the uninterrupted run in {different[:5]}")
        return 1
    print(f"PASS: {what}, all {len(whole)} tensors of step {STEPS} equal the uninterrupted run")
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        job = start_until_checkpoint(tmp, "faulted", 1, KILL_AT)
        if job is None:
            return 1
        victim = workers_of(job.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        print(f"killed worker pid {victim} with SIGKILL after the step-{KILL_AT} checkpoint appeared")
        output, _ = job.communicate(timeout=600)
        if job.returncode != 0 or "resumed from" not in output:
            print(output[-4000:])
            print(f"FAIL: torchrun exited {job.returncode}; expected a restart that resumes and finishes")
            return 1
        resumed = [line for line in output.splitlines() if "resumed from" in line]
        print(resumed[0])
        return compare_with_whole(tmp, "faulted", "after the kill and restart")


if __name__ == "__main__":
    sys.exit(main())

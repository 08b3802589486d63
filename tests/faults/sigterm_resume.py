"""SIGTERM to a running 4-process torchrun job, as Slurm sends before the time limit: every rank
stops after the same step, a checkpoint is written, the job exits with a sentence (no traceback),
and the same command launched again resumes and finishes with the parameters of an uninterrupted
run (bit for bit, float32, gloo).

Not part of `make test`; `make fault-test` runs it after kill_resume.py.
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

from kill_resume import STEPS, command, final_tensors, start_until_checkpoint, workers_of

FIRST = 4  # SIGTERM once the step-FIRST checkpoint exists


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        job = start_until_checkpoint(tmp, "signalled", 0, FIRST)
        if job is None:
            return 1
        workers = workers_of(job.pid)
        for pid in [job.pid, *workers]:  # Slurm signals every process of the step ...
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        for pid in workers:  # ... and torchrun forwards it: each worker gets a second copy, later
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        output, _ = job.communicate(timeout=300)
        stops = sorted({line.split("k2train: ", 1)[1] for line in output.splitlines() if "stopped by SIGTERM" in line})
        if len(stops) != 1 or "worker" in " ".join(stops) or "Traceback" in output.split("stopped by SIGTERM")[0]:
            print(output[-4000:])
            print("FAIL: expected every rank to stop with one and the same sentence")
            return 1
        print(f"torchrun exited {job.returncode}; the ranks said: {stops[0]}")
        again = subprocess.run(command(tmp, "signalled", 0), env=env, capture_output=True, text=True)
        if again.returncode != 0 or "resumed from" not in again.stdout:
            print(again.stdout[-3000:], again.stderr[-3000:])
            print(f"FAIL: the relaunch exited {again.returncode}; expected it to resume and finish")
            return 1
        print([line for line in again.stdout.splitlines() if "resumed from" in line][0])
        whole, resumed = final_tensors(tmp / "whole" / "ckpt", tmp), final_tensors(tmp / "signalled" / "ckpt", tmp)
        different = [k for k in whole if not torch.equal(whole[k], resumed[k])]
        if whole.keys() != resumed.keys() or different:
            print(f"FAIL: final state differs from the uninterrupted run in {different[:5]}")
            return 1
        print(f"PASS: after SIGTERM and a relaunch, all {len(whole)} tensors of step {STEPS} equal the uninterrupted run")
        return 0


if __name__ == "__main__":
    sys.exit(main())

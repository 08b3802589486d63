"""SIGTERM to a running 4-process torchrun job, as Slurm sends before the time limit: every rank
stops after the same step, a checkpoint is written, the job exits with a sentence (no traceback),
and the same command launched again resumes and finishes with the parameters of an uninterrupted
run (bit for bit, float32, gloo).

Not part of `make test`; `make fault-test` runs it after kill_resume.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kill_resume import command, compare_with_whole, start_until_checkpoint, workers_of

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
        # The ranks share torchrun's stdout, so two ranks' sentences can land on one line.
        stops = sorted(set(re.findall(r"k2train: (stopped by SIGTERM.*?\.)(?=k2train: |\r?\n|$)", output)))
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
        return compare_with_whole(tmp, "signalled", "after SIGTERM and a relaunch")


if __name__ == "__main__":
    sys.exit(main())

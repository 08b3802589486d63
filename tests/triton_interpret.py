"""Run Triton kernels on the CPU interpreter in a child process and bring their outputs back.

`triton.jit` decides when a kernel is decorated whether it is compiled for a GPU or interpreted
(TRITON_INTERPRET is read through triton.knobs at import), and Triton's own modules make the same
choice when they are first imported: one process cannot hold both kinds safely. So a kernel test
module runs itself as a script in a child started with TRITON_INTERPRET=1; the child saves what the
kernels returned with torch.save, and the tests compare it here with the eager reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def run_interpreted(script: str, tmp_path_factory: pytest.TempPathFactory, timeout: float = 240) -> dict:
    """`python script OUT` under TRITON_INTERPRET=1; returns torch.load(OUT) (what the script saved)."""
    path = str(tmp_path_factory.mktemp("interpreted") / "outputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script, path], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"the interpreted kernels of {os.path.basename(script)} failed:\n{proc.stderr[-4000:]}")
    return torch.load(path)

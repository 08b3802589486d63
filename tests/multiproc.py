"""Run a function on every rank of a local gloo world, for multi-process tests.

`run_world(world, "module:function", payload)` starts `world` Python processes running this file;
each sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls
`function(payload)` and saves its return value with torch.save. The parent returns the per-rank
results, or raises with the failing ranks' output. On a rank, `tiny_rank` starts the tiny config's
rank the way `k2train train` and `k2train profile` start theirs (parallel/startup.py).
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "configs" / "k2_tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, target: str, payload: Any, timeout: float = 240) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.save(payload, tmp_path / "payload.pt")
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(
                os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            )
            log = open(tmp_path / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen(
                [sys.executable, __file__, target, tmp], env=env, stdout=log, stderr=subprocess.STDOUT
            ), log))
        failed = []
        for rank, (proc, log) in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other, _ in procs:
                    other.kill()
                code = "timeout"
            log.close()
            if code != 0:
                failed.append(rank)
        if failed:
            logs = "\n".join(
                f"--- rank {r} ---\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}" for r in failed[:2]
            )
            raise RuntimeError(f"ranks {failed} of {world} failed running {target}:\n{logs}")
        return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(world)]


def tiny_rank(overrides: list[str], data: str | None = None, env=None, **runner_options):
    """(cfg, state, runner) of this process's rank of configs/k2_tiny.yaml with `overrides`, launched
    as `env` says (default: the launcher's variables, which run_world sets); the runner
    reads `data` (no sampler without it) and takes `runner_options` (parallel.startup.rank_runner)."""
    from k2train.config.load import load_config
    from k2train.train.loop import open_sampler
    from parallel.startup import rank_runner, start_rank
    from launch.env import launch_env

    cfg = load_config(TINY, overrides)
    state = start_rank(cfg, launch_env() if env is None else env)
    runner = rank_runner(cfg, state, None if data is None else open_sampler(cfg, data), **runner_options)
    return cfg, state, runner


def _worker(target: str, tmp: str) -> None:
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    payload = torch.load(Path(tmp) / "payload.pt", weights_only=False)
    result = function(payload)
    torch.save(result, Path(tmp) / f"result{os.environ['RANK']}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1], sys.argv[2])

"""Run a function on every rank of a local gloo world, for multi-process tests.

`run_world(world, "module:function", payload)` starts `world` processes; each sets torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls `function(payload)` and
saves its return value with torch.save. The parent returns the per-rank results, or raises with the
failing ranks' output. On a rank, `tiny_rank` starts the tiny config's rank the way `k2train train`
and `k2train profile` start theirs (parallel/startup.py).

The ranks are forked from a forkserver that has imported torch, its pipelining package and
k2train's rank start-up once (`PRELOAD`): a fresh interpreter spends about 5 s of CPU on those
imports, which for an 8-process world on 2 cores is 20 s of every test. Each rank is still a
process of its own, started before anything distributed or threaded exists in it.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "configs" / "k2_tiny.yaml"
# What every rank imports, imported once in the forkserver (imports only: no threads, no process group).
PRELOAD = ["torch", "torch.distributed.pipelining", "parallel.startup", "parallel.parallelize",
           "k2train.config.load", "k2train.train.loop", "launch.env"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    # The server inherits this environment when it starts; one intra-op thread per rank, as torchrun's
    # OMP_NUM_THREADS=1 gives, set before torch is imported there.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_world(world: int, target: str, payload: Any, timeout: float = 240) -> list[Any]:
    context = _context()
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
            proc = context.Process(target=_rank_main, args=(target, tmp, env, str(tmp_path / f"rank{rank}.log")),
                                   name=f"rank{rank}")
            proc.start()
            procs.append(proc)
        failed = []
        for rank, proc in enumerate(procs):
            proc.join(timeout=timeout)
            if proc.exitcode is None:  # timed out: stop the whole world
                for other in procs:
                    other.kill()
                proc.join()
            if proc.exitcode != 0:
                failed.append(rank)
        for proc in procs:
            proc.join()
            proc.close()
        if failed:
            logs = "\n".join(
                f"--- rank {r} ---\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}" for r in failed[:2]
            )
            raise RuntimeError(f"ranks {failed} of {world} failed running {target}:\n{logs}")
        return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(world)]


def _rank_main(target: str, tmp: str, env: dict[str, str], log: str) -> None:
    """A rank, in the forked process: its environment, its output to `log`, then the target."""
    os.environ.clear()
    os.environ.update(env)
    for path in reversed(env["PYTHONPATH"].split(os.pathsep)):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)
    try:
        _worker(target, tmp)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


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

"""`k2train train` on any layout: validate, start the process groups, build the runner, train.

Launched as one process, or as many under torchrun (or a Slurm step with one task per GPU). The
layout is checked against the launched world before any process group exists, so a layout that
does not fit stops every rank with the same sentence.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from k2train.config.schema import JobConfig
from k2train.train.loop import NonFiniteLossError, RunResult, data_prefix, open_samplers, train
from parallel.checkpoint.checkpointer import Checkpointer, gather_objects
from parallel.checkpoint.lock import CheckpointLock
from parallel.checkpoint.metadata import CheckpointError
from parallel.checkpoint.resume import StoppedRunError, record_stop
from parallel.evaluate import Evaluator
from parallel.preflight import check_paths
from parallel.signals import StopSignals
from parallel.pipeline.split import describe_split
from parallel.startup import rank_runner, start_rank
from parallel.state import LaunchEnv, ParallelState


def run_training(cfg: JobConfig, env: LaunchEnv) -> RunResult:
    """Train `cfg` as this process's rank of the launched world `env` (launch/env.py reads it)."""
    state = start_rank(cfg, env, check=lambda layout, device: check_paths(cfg, checkpoint_root(cfg)))
    signals = StopSignals(state.device, state.is_distributed).install()
    try:
        return _train_rank(cfg, state, signals)
    finally:
        signals.restore()
        if state.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train_rank(cfg: JobConfig, state: ParallelState, signals: StopSignals) -> RunResult:
    root = checkpoint_root(cfg)
    lock = _lock(cfg, root, state)
    try:
        return _train_locked(cfg, state, signals, root, lock)
    except StoppedRunError:
        raise
    except NonFiniteLossError as err:
        if lock is not None and state.rank == 0:  # a relaunched job reads it and stops the same way
            record_stop(root, str(err))
        raise
    finally:
        if lock is not None and state.rank == 0:
            lock.release()


def _lock(cfg: JobConfig, root: Path, state: ParallelState) -> CheckpointLock | None:
    """Rank 0 takes the checkpoint directory's lock (when the run saves); every rank learns the outcome."""
    if not cfg.checkpoint.every_steps:
        return None
    lock, failure = CheckpointLock(root, cfg.checkpoint.take_over), None
    if state.rank == 0:
        try:
            lock.acquire()
        except CheckpointError as err:
            failure = err
    problem = gather_objects(str(failure) if failure else "", state.is_distributed)[0]
    if failure is not None:
        raise failure
    if problem:
        raise CheckpointError(problem)
    return lock


def _train_locked(cfg: JobConfig, state: ParallelState, signals: StopSignals, root: Path,
                  lock: CheckpointLock | None) -> RunResult:
    sampler, valid_sampler = open_samplers(cfg, shared_data_prefix(cfg, state))
    runner = rank_runner(cfg, state, sampler)
    evaluation = Evaluator(runner, valid_sampler, cfg.train.eval_batches) if valid_sampler and cfg.train.eval_every else None
    layout = state.layout
    if state.is_logging_rank and layout.pp > 1:
        print(f"k2train: {layout.num_stages} pipeline stages over pp={layout.pp} x vp={layout.vp}:")
        print(describe_split(runner.split, layout.pp))
    header = dict(world_size=layout.world_size, pp=layout.pp, vp=layout.vp, ep=layout.ep, dp=layout.dp)
    run_id = gather_objects(lock.owner.run_id if lock is not None else None, state.is_distributed)[0]
    checkpointer = Checkpointer(cfg, root, state.rank, state.is_distributed, run_id)
    if lock is not None and lock.previous is not None and state.rank == 0:
        checkpointer.remove_partials(lock.previous.run_id)  # its owner is gone: nobody finishes them
    runner.attach_checkpointer(checkpointer, header, signals)
    return train(cfg, runner, header, state.is_logging_rank, evaluation)


def checkpoint_root(cfg: JobConfig) -> Path:
    """checkpoint.dir, or <logging.run_root>/<name>/checkpoints: the same for every launch of a job,
    so a restarted job finds what it saved."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.logging.run_root) / cfg.name / "checkpoints"


def shared_data_prefix(cfg: JobConfig, state: ParallelState) -> str:
    """The data prefix; the embedded corpus is prepared by rank 0 alone while the others wait."""
    if cfg.data.prefix or not state.is_distributed:
        return data_prefix(cfg)
    ready = torch.zeros(1, device=state.device)  # on the device: NCCL broadcasts device tensors only
    prefix = None
    if state.rank == 0:
        try:
            prefix = data_prefix(cfg)
            ready.fill_(1)
        finally:
            dist.broadcast(ready, src=0)
    else:
        dist.broadcast(ready, src=0)
    if not ready.item():
        raise RuntimeError("rank 0 could not prepare the default corpus; see its error.")
    return prefix or data_prefix(cfg)  # the others find it prepared

"""One rank's start-up, the same for training, profiling and the tests.

`start_rank` lays the config out on the launched world and checks it (parallel/layout.py), picks
the rank's device, runs the caller's own checks, and only then starts the process groups
(parallel/state.py): a layout or a path that cannot work stops every rank with the same sentence
before any rank waits on another. `rank_runner` builds the rank's model parts, parallelizes them
(parallel/parallelize.py) and hands them to the runner that drives the steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from k2train.config.checks import ConfigError
from k2train.config.schema import JobConfig
from k2train.data.sampler import SequenceSampler
from parallel.layout import Layout, layout_for
from parallel.parallelize import build_rank_parts, parallelize
from parallel.runner import ParallelRunner
from parallel.state import LaunchEnv, ParallelState, device_for, init_parallel


def start_rank(cfg: JobConfig, env: LaunchEnv,
               check: Callable[[Layout, torch.device], None] | None = None) -> ParallelState:
    """This process's rank of `cfg` under the launch `env`: its layout, device and process groups.
    `check(layout, device)` runs before any process group exists (paths, memory)."""
    layout = layout_for(cfg, env.world_size)
    try:
        device = device_for(cfg.parallel.device, env.local_rank)
    except RuntimeError as err:  # no CUDA device where the config asks for one
        raise ConfigError(f"{cfg.name}: {err}") from None
    if check is not None:
        check(layout, device)
    return init_parallel(layout, env, device)


def rank_runner(cfg: JobConfig, state: ParallelState, sampler: SequenceSampler | None, *,
                trace_schedule: bool = False, measure_activations: bool = False) -> ParallelRunner:
    """The runner of this rank's parallelized parts, reading its batches from `sampler`."""
    rank = parallelize(build_rank_parts(cfg, state), state, cfg, trace_schedule=trace_schedule,
                       measure_activations=measure_activations)
    return ParallelRunner(cfg, state, sampler, rank)

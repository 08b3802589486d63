"""The parallel state of one rank: its layout coordinates and process groups, built once, passed
explicitly (STYLE §3). The layout is validated before any process group exists.

Rank and world come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or, when a job step
starts one task per GPU, from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). The backend
follows the device: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.layout import Layout, RankCoords


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """This process's rank, world size and local rank from torchrun's or Slurm's variables (1 process if neither)."""
    env = os.environ if environ is None else environ
    for rank_key, world_key, local_key in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rank_key in env and world_key in env:
            return LaunchEnv(int(env[rank_key]), int(env[world_key]), int(env.get(local_key, "0")))
    return LaunchEnv(0, 1, 0)


@dataclass
class ParallelState:
    """Everything distributed a rank needs; groups of size 1 are None (no collective is issued)."""

    layout: Layout
    rank: int
    coords: RankCoords
    device: torch.device
    pipeline_group: dist.ProcessGroup | None
    expert_group: dist.ProcessGroup | None
    dense_group: dist.ProcessGroup | None
    expert_grad_group: dist.ProcessGroup | None

    @property
    def is_distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def sequence_rank(self) -> int:
        return self.layout.sequence_rank(self.rank)

    @classmethod
    def single(cls, layout: Layout, device: torch.device) -> ParallelState:
        return cls(layout, 0, layout.coords(0), device, None, None, None, None)


def init_parallel(layout: Layout, env: LaunchEnv, device: torch.device) -> ParallelState:
    """Start the process group (if the world has more than one rank) and build this rank's groups."""
    if layout.world_size != env.world_size:
        raise ValueError(f"the layout is for {layout.world_size} ranks, but {env.world_size} processes were launched.")
    if env.world_size == 1:
        return ParallelState.single(layout, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, timeout=dt.timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    groups = {kind: _my_group(layout, kind, env.rank) for kind in ("pipeline", "expert", "dense", "expert_grad")}
    return ParallelState(
        layout, env.rank, layout.coords(env.rank), device,
        groups["pipeline"], groups["expert"], groups["dense"], groups["expert_grad"],
    )


def _my_group(layout: Layout, kind: str, rank: int) -> dist.ProcessGroup | None:
    """Create every group of `kind` (all ranks must take part in each creation) and keep ours."""
    all_groups = layout.groups(kind)
    if len(all_groups[0]) == 1:
        return None
    mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in all_groups])
    return mine


def device_for(name: str, local_rank: int) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK for cuda, cpu otherwise."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda, but torch sees no CUDA device; use cpu or auto.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")

"""The parallel state of one rank: its layout coordinates and process groups, built once, passed
explicitly. The layout is validated before any process group exists.

A rank's place in the world arrives as a `LaunchEnv`, read from torchrun's or Slurm's variables by
the command that started the process (launch/env.py). The ranks meet at MASTER_ADDR:MASTER_PORT; a
rendezvous that does not complete within K2TRAIN_RENDEZVOUS_TIMEOUT seconds stops the rank with a
sentence naming the address, instead of waiting out the collective timeout. The backend follows the
device: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.collectives import Collectives
from parallel.layout import Layout, RankCoords

RENDEZVOUS_TIMEOUT_VAR = "K2TRAIN_RENDEZVOUS_TIMEOUT"
# Long enough for the nodes of a real job to start at different times (container imports), short
# enough that a wrong address fails in minutes rather than after the collective timeout.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)


class LaunchError(RuntimeError):
    """A launch this rank cannot start from: a bad launcher variable or a rendezvous that failed."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its place in the world and where the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str = ""
    master_port: int = 0
    rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S
    launcher: str = "one process"       # "torchrun", "Slurm" or "one process", for messages
    agent_store: bool = False           # torchrun's agent already hosts the store at MASTER_PORT


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
    # What the runtime calls torch.distributed's collectives through (parallel/collectives.py).
    collectives: Collectives = field(default_factory=Collectives)

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
            backend, store=rendezvous_store(env), rank=env.rank, world_size=env.world_size,
            timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None,
        )
    groups = {kind: my_group(layout, kind, env.rank) for kind in ("pipeline", "expert", "dense", "expert_grad")}
    return ParallelState(
        layout, env.rank, layout.coords(env.rank), device,
        groups["pipeline"], groups["expert"], groups["dense"], groups["expert_grad"],
    )


def rendezvous_store(env: LaunchEnv) -> dist.Store:
    """The TCP store where all ranks meet, connected within `env.rendezvous_timeout_s`.

    Rank 0 hosts it on MASTER_PORT and waits for the other ranks; they connect to
    MASTER_ADDR:MASTER_PORT (under torchrun every rank connects to the agent's store). Once all
    have arrived, waits on the store follow the collective timeout again.
    """
    where = f"{env.master_addr}:{env.master_port}"
    if not env.master_addr or not env.master_port:
        raise LaunchError(
            f"{env.launcher} launched rank {env.rank} of {env.world_size}, but MASTER_ADDR and MASTER_PORT "
            f"(the address and port of rank 0's node) are not both set (got {where!r}).")
    hosts = env.rank == 0 and not env.agent_store
    try:
        store = dist.TCPStore(
            env.master_addr, env.master_port, env.world_size, is_master=hosts,
            timeout=dt.timedelta(seconds=env.rendezvous_timeout_s), wait_for_workers=True, multi_tenant=True,
        )
    except dist.DistError as err:
        raise LaunchError(_rendezvous_failure(env, hosts, err)) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    # torchrun's agent store outlives a restart: without a per-attempt prefix, restarted ranks would
    # read the addresses the killed ranks published and fail to connect.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/k2train/attempt_{attempt}", store)


def _rendezvous_failure(env: LaunchEnv, hosts: bool, err: Exception) -> str:
    """One sentence for a rendezvous that failed: who, where, how long, and what to check."""
    where, wait = f"{env.master_addr}:{env.master_port}", f"{env.rendezvous_timeout_s:g} s"
    lines = str(err).strip().splitlines()
    cause = lines[0].rstrip(".") if lines else type(err).__name__
    if hosts and isinstance(err, dist.DistStoreError):
        return (f"rank 0 hosts the rendezvous at {where} (MASTER_ADDR:MASTER_PORT), but not all {env.world_size} "
                f"ranks arrived within {wait} ({cause}); check that every rank started and can reach {where}, "
                f"or raise {RENDEZVOUS_TIMEOUT_VAR}.")
    if hosts and "listen" in cause:
        return f"rank 0 could not host the rendezvous on port {env.master_port} (MASTER_PORT): {cause}."
    if hosts:
        return (f"rank 0 hosts the rendezvous on port {env.master_port} but could not reach it at {where} within "
                f"{wait} ({cause}); MASTER_ADDR must be the address of rank 0's node.")
    return (f"rank {env.rank} of {env.world_size} could not reach the rendezvous at {where} "
            f"(MASTER_ADDR:MASTER_PORT) within {wait} ({cause}); check that rank 0 is running there, "
            f"or raise {RENDEZVOUS_TIMEOUT_VAR}.")


def my_group(layout: Layout, kind: str, rank: int) -> dist.ProcessGroup | None:
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

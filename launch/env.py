"""This process's launch, read from its launcher's variables: torchrun's (RANK, WORLD_SIZE,
LOCAL_RANK) or, inside a Slurm job step that starts one task per GPU, Slurm's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID); MASTER_ADDR:MASTER_PORT where the ranks meet and
K2TRAIN_RENDEZVOUS_TIMEOUT, how long they wait for each other. The commands read it once and hand
the `LaunchEnv` to the runtime (parallel/state.py), which never reads the environment for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from parallel.state import DEFAULT_RENDEZVOUS_TIMEOUT_S, RENDEZVOUS_TIMEOUT_VAR, LaunchEnv, LaunchError

# (rank, world size, local rank) variables of each launcher, in order of precedence: torchrun run
# inside a Slurm step sets its own per-process RANK over Slurm's per-task SLURM_PROCID.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's launch from torchrun's or Slurm's variables (one process if neither).

    Slurm's variables count only inside a job step (SLURM_STEP_ID set, i.e. under srun): the batch
    script itself also carries SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one process.
    """
    env = os.environ if environ is None else environ
    rank, world, local, launcher = 0, 1, 0, "one process"
    for name, rank_key, world_key, local_key in _LAUNCHERS:
        if name == "Slurm" and "SLURM_STEP_ID" not in env:
            continue
        if rank_key in env and world_key in env:
            rank, world = _int_var(env, rank_key, name), _int_var(env, world_key, name)
            local, launcher = _int_var(env, local_key, name, default=0), name
            break
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{launcher} gave rank {rank} of a world of {world} processes; expected 0 <= rank < world.")
    port = _int_var(env, "MASTER_PORT", launcher, default=0)
    if not 0 <= port < 2**16:
        raise LaunchError(f"MASTER_PORT is {port}, expected a TCP port in 1..65535.")
    return LaunchEnv(
        rank, world, local, env.get("MASTER_ADDR", ""), port, _timeout_var(env), launcher,
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def _int_var(env: Mapping[str, str], key: str, launcher: str, default: int | None = None) -> int:
    if key not in env and default is not None:
        return default
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"{key} is {env[key]!r} ({launcher}'s variable), expected a whole number.") from None


def _timeout_var(env: Mapping[str, str]) -> float:
    text = env.get(RENDEZVOUS_TIMEOUT_VAR, "")
    if not text:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise LaunchError(f"{RENDEZVOUS_TIMEOUT_VAR} is {text!r}, expected a positive number of seconds.")
    return seconds

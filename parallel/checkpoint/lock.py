"""One writer per checkpoint directory: a lock file created atomically, naming its owner.

Two runs saving into one directory delete and replace each other's checkpoints. Rank 0 of a run
creates `k2train.lock` with O_CREAT|O_EXCL (atomic on a POSIX file system) holding its host, pid
and launch id, before the first step. Another run finding the lock is refused with a sentence
naming the owner while it may live; the lock is taken over only when its owner is provably gone
(same host and its pid no longer exists), when it is the same launch restarted (torchrun
--max-restarts keeps TORCHELASTIC_RUN_ID, Slurm keeps SLURM_JOB_ID), or with
checkpoint.take_over=true. The lock is removed when the run ends.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from parallel.checkpoint.metadata import CheckpointError, UnsafeMetadataError, read_json_file

LOCK = "k2train.lock"
_FORCED = "checkpoint.take_over=true"


class CheckpointLockError(CheckpointError):
    """The checkpoint directory belongs to another live run."""


def launch_id() -> str:
    """The id of this launch, equal on every rank and kept by restarts of the same job."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":
            return f"{var.split('_')[0].lower()}-{value}"
    return ""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    launch: str
    run_id: str
    since: str

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on host {self.host}, since {self.since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointLock:
    """The lock of `root`, held by this process (rank 0) from `acquire` to `release`."""

    def __init__(self, root: Path, take_over: bool):
        self.root, self.take_over = root, take_over
        self.path = root / LOCK
        self.owner = LockOwner(socket.gethostname(), os.getpid(), launch_id(), uuid.uuid4().hex[:12],
                               dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        # The owner this lock was taken from when it is provably gone (its partial saves are abandoned);
        # None after a forced take-over, whose owner may still be writing.
        self.previous: LockOwner | None = None

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
            return
        except FileExistsError:
            pass
        other = self._read()
        why = self._may_take(other)
        if why is None:
            raise CheckpointLockError(
                f"checkpoint directory {self.root} is in use by {other.describe()} (lock file {self.path}); "
                "give this run another checkpoint.dir, or, if that run is gone, --set checkpoint.take_over=true.")
        print(f"k2train: taking over {self.path} from {other.describe()}: {why}")
        self.previous = None if why == _FORCED else other
        self.path.unlink(missing_ok=True)
        try:
            self._create()
        except FileExistsError:
            raise CheckpointLockError(f"another run took {self.path} at the same time; start one run per "
                                      "checkpoint directory.") from None

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner.__dict__, f)
            f.flush()
            os.fsync(f.fileno())

    def _read(self) -> LockOwner:
        try:
            data = read_json_file(self.path, "the host, pid and run id of the run writing this directory")
            return LockOwner(str(data["host"]), int(data["pid"]), str(data.get("launch", "")),
                             str(data["run_id"]), str(data.get("since", "?")))
        except FileNotFoundError:
            return LockOwner("?", -1, "", "?", "?")  # released meanwhile: provably gone
        except (UnsafeMetadataError, KeyError, TypeError, ValueError) as err:
            if self.take_over:
                return LockOwner("?", -1, "", "?", "?")
            raise CheckpointLockError(f"{self.path} is not a k2train lock ({err}); remove it if no run uses "
                                      f"{self.root}, or pass --set checkpoint.take_over=true.") from None

    def _may_take(self, other: LockOwner) -> str | None:
        if other.pid == -1:
            return "the lock was released or unreadable"
        if other.launch and other.launch == self.owner.launch:
            return "it is an earlier attempt of this same job"
        if other.host == self.owner.host and not _pid_alive(other.pid):
            return f"pid {other.pid} no longer exists on this host"
        return _FORCED if self.take_over else None

    def release(self) -> None:
        """Remove the lock if it is still ours (a take-over by force may have replaced it)."""
        try:
            if json.loads(self.path.read_text()).get("run_id") == self.owner.run_id:
                self.path.unlink()
        except (OSError, ValueError) as err:
            if getattr(err, "errno", None) not in (None, errno.ENOENT):
                raise

"""Where a run resumes: the stop marker of a NaN stop, the `latest` checkpoint, or a fallback.

A run stopped on a non-finite loss leaves `k2train-stopped.json` in its checkpoint directory:
under torchrun --max-restarts or a Slurm requeue the relaunched job reads it and stops with the
same sentence instead of replaying the same steps into the same NaN. When the newest checkpoint
cannot be read, the run stops and names the newest intact one; it resumes from that one only with
checkpoint.fallback=true, because a silent fallback loses steps.
"""

from __future__ import annotations

from pathlib import Path

from k2train.train.loop import NonFiniteLossError
from parallel.checkpoint.checkpointer import CheckpointError, Checkpointer, complete_checkpoints, latest_checkpoint
from parallel.checkpoint.metadata import read_json_file, write_json_file

STOPPED = "k2train-stopped.json"


class StoppedRunError(NonFiniteLossError):
    """The run stopped for good earlier (a non-finite loss); the message is the original sentence."""


def record_stop(root: Path, message: str) -> None:
    """Leave the marker a relaunched job obeys (rank 0, after a non-finite stop)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json_file(root / STOPPED, dict(message=message))


def check_not_stopped(root: Path) -> None:
    marker = root / STOPPED
    if marker.is_file():
        record = read_json_file(marker, "the step and reason of a non-finite stop")
        raise StoppedRunError(f"{record['message']}\n(The stop is recorded in {marker}; remove that file to "
                              "train on from the last good checkpoint, e.g. with a lower learning rate.)")


def resume_point(checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from (None: a fresh start in an empty directory), verified."""
    root = checkpointer.root
    check_not_stopped(root)
    try:
        path = latest_checkpoint(root)
        if path is not None:
            checkpointer.verify(path)
        return path
    except CheckpointError as err:
        intact = _newest_intact(checkpointer, exclude=_named(root))
        if intact is None:
            raise
        if not checkpointer.cfg.checkpoint.fallback:
            raise CheckpointError(f"{err} The newest intact checkpoint is {intact}; resume from it with "
                                  "--set checkpoint.fallback=true (the steps after it are lost).") from None
        if checkpointer.rank == 0:
            print(f"k2train: {err} Falling back to the newest intact checkpoint {intact} (checkpoint.fallback=true).")
        return intact


def _named(root: Path) -> Path | None:
    pointer = root / "latest"
    return root / pointer.read_text().strip() if pointer.is_file() else None


def _newest_intact(checkpointer: Checkpointer, exclude: Path | None) -> Path | None:
    for path in reversed(complete_checkpoints(checkpointer.root)):
        if path == exclude:
            continue
        try:
            checkpointer.verify(path)
            return path
        except CheckpointError:
            continue
    return None

"""Every path a run will write or read, checked before the first step, each with one sentence.

Without this a read-only checkpoint.dir failed with a traceback after the first save, two steps
in; a regular file in its place said "[Errno 17] File exists". Each rank checks on its own before
any process group exists, so a bad path stops every rank with the same sentence and none waits.
Permission bits do not stop root, so writability is proven by creating and removing a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from k2train.config.checks import ConfigError
from k2train.config.schema import JobConfig
from k2train.data.default_corpus import cache_dir


class PathError(ConfigError):
    """A path the run needs that cannot be used; the message names the path and its config key."""


def check_writable_dir(path: Path, what: str) -> None:
    """Prove that `path` is, or can be created as, a writable directory (nothing is left behind:
    a missing one is probed in its nearest existing parent), or raise PathError naming `what`."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise PathError(f"{what} {path} cannot be a directory: {existing} is a file.")
    probe = existing / f".k2train-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PathError(f"{what} {path} is not writable ({err.strerror or err}); choose a writable place.") from None


def check_paths(cfg: JobConfig, checkpoint_root: Path) -> None:
    """Raise PathError for the first path of the run that cannot be used (wandb writes under the
    run directory, inside logging.run_root)."""
    if cfg.checkpoint.every_steps or checkpoint_root.exists():
        check_writable_dir(checkpoint_root, "checkpoint directory (checkpoint.dir)")
    check_writable_dir(Path(cfg.logging.run_root), "run root (logging.run_root)")
    if not cfg.data.prefix:
        check_writable_dir(cache_dir(), "data cache ($K2TRAIN_CACHE, default ~/.cache/k2train)")
    elif not Path(cfg.data.prefix).parent.is_dir():
        raise PathError(f"data.prefix {cfg.data.prefix}: its directory {Path(cfg.data.prefix).parent} does not exist.")

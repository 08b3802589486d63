"""A launched job's exit status (`k2train train`, `k2train profile`): what stopped it, told in one
sentence on stderr, and the number the launcher (torchrun, Slurm) sees."""

from __future__ import annotations

import sys
from collections.abc import Callable

from k2train.train.loop import NonFiniteLossError
from parallel.signals import JobStopped
from parallel.state import LaunchError


def exit_code(job: Callable[[], object]) -> int:
    """Run a launched job (training, profiling) and give its exit status: 0 when it ends, 1 when a
    non-finite loss stopped it, 2 for a bad launch (variables, rendezvous), told in one sentence."""
    try:
        job()
    except NonFiniteLossError as err:
        print(f"k2train: {err}", file=sys.stderr)
        return 1
    except JobStopped as err:
        print(f"k2train: {err}", file=sys.stderr)
        return err.exit_code
    except LaunchError as err:
        print(f"k2train: error: {err}", file=sys.stderr)
        return 2
    return 0

"""SIGTERM / SIGINT: stop at a step boundary on every rank, checkpoint, and exit with a sentence.

Slurm sends SIGTERM before the time limit (and on scancel), torchrun forwards it, and a user
presses Ctrl-C. The handler only records the signal; at the end of each step the ranks agree on
it with one MAX all-reduce, so every rank finishes the same step and stops together (a rank
signalled alone cannot leave the others waiting in a collective). A second signal interrupts at
once; copies that arrive within REPEAT_WINDOW_S of the first are the same request (Slurm signals
every process of the step and torchrun forwards what it receives, so a worker gets two at once).
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
REPEAT_WINDOW_S = 5.0


class JobStopped(RuntimeError):
    """The job stopped on a signal after a complete step; the message says where it can resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Records SIGTERM / SIGINT from `install` to `restore` (main thread only)."""

    def __init__(self, device: torch.device, distributed: bool, clock=time.monotonic):
        self.device, self.distributed, self.clock = device, distributed, clock
        self.received, self.received_at = 0, 0.0
        self.previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _NAMES:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = self.clock()
        if not self.received:
            self.received, self.received_at = signum, now
        elif now - self.received_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt(f"second {_NAMES[signum]}: stopping at once")

    def agreed(self) -> int:
        """The signal any rank received (0: none), the same on every rank."""
        if not self.distributed:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return _NAMES.get(signum, f"signal {signum}")


def stop_on_signal(runner, step: int, saved: bool) -> None:
    """After `step`: if any rank was signalled, every rank checkpoints (checkpoint.save_on_signal)
    and raises JobStopped with the same sentence."""
    signum = runner.stop_signals.agreed()
    if not signum or step == runner.cfg.train.steps:  # the run is complete: it ends as usual
        return
    cfg, checkpointer = runner.cfg, runner.checkpointer
    where = "no checkpoint was written (checkpoints are off or checkpoint.save_on_signal is false)"
    if checkpointer is not None and cfg.checkpoint.every_steps and cfg.checkpoint.save_on_signal:
        if not saved:
            checkpointer.save(step, runner.checkpoint_tensors(), runner.sampler.state_dict(), runner.layout_header)
        checkpointer.wait()
        where = f"its checkpoint is in {checkpointer.root}; run the same command again to resume at step {step + 1}"
    elif checkpointer is not None and saved:
        checkpointer.wait()
        where = f"its checkpoint is in {checkpointer.root}"
    raise JobStopped(f"stopped by {StopSignals.name(signum)} after step {step} of {cfg.train.steps}; {where}.", signum)

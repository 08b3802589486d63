"""What a rank of `make bench-overlap` records besides its step times, by wrapping its collectives
(`ParallelState.collectives`, this object only) and its turns.

- `exchanges_alone`: the time the link needs for one step's all-to-alls with no compute between them.
- `WaitRecorder` (`--waits`): where the rank waits. Every exchange's wait is timed where the runtime
  waits on it: a forward's counts (a synchronous exchange), the forward's dispatch and combine, the
  backward's combine and dispatch (a MoE layer's backward runs them in that order), and, with
  overlap on, a paired task's pipeline input after the other task's turn. An exchange is "paired"
  when the other task of a pair was still running as it was issued; otherwise (a warm-up forward, a
  cool-down backward, the tail of a pair's longer task, or overlap off) "alone". Shaped minus
  unshaped, per kind, is where the exposed time goes. With overlap off every exchange is
  synchronous, and its wait is the whole call.
"""

from __future__ import annotations

import statistics
import threading
import time

KINDS = ("counts", "forward dispatch", "forward combine", "backward combine", "backward dispatch")
PLACES = ("paired", "alone")
PIPELINE = "pipeline input, paired"


def wait_keys() -> list[str]:
    """The recorded waits' names, in the order the report prints them."""
    return [f"{kind}, {place}" for kind in KINDS for place in PLACES] + [PIPELINE]


class WaitRecorder:
    """Seconds waited per kind of wait, summed over the steps taken while `install`ed."""

    def __init__(self, collectives, turns):
        self.collectives, self.turns = collectives, turns
        self.reset()
        self._lock = threading.Lock()
        self._order = threading.local()  # per task thread: which big exchange comes next

    def install(self) -> None:
        exchange = self.collectives.all_to_all_single

        def timed(out, inp, out_splits, in_splits, group=None, async_op=False):
            kind = self._kind(out_splits is None)
            place = PLACES[0] if self.turns is not None and self.turns.paired() else PLACES[1]
            start = time.perf_counter()
            work = exchange(out, inp, out_splits, in_splits, group=group, async_op=async_op)
            if not async_op:
                self._add(f"{kind}, {place}", time.perf_counter() - start)
                return work
            return _TimedWork(work, lambda seconds: self._add(f"{kind}, {place}", seconds))

        self.collectives.all_to_all_single = timed
        if self.turns is not None:
            wait_for = self.turns.wait_for  # its own logic, each input's wait timed

            def timed_inputs(works):
                wait_for([_TimedWork(work, lambda seconds: self._add(PIPELINE, seconds)) for work in works])

            self.turns.wait_for = timed_inputs

    def reset(self) -> None:
        self.seconds = dict.fromkeys(wait_keys(), 0.0)

    def per_step(self, steps: int) -> dict[str, float]:
        return {f"wait: {key}": seconds / steps for key, seconds in self.seconds.items()}

    def _kind(self, counts: bool) -> str:
        """A task runs its operations one after the other, so its exchanges come in a fixed order: a
        forward's MoE layer exchanges counts, then dispatches, then combines; a backward's layer
        combines, then dispatches. (Grad mode cannot tell them apart: an autograd Function's forward
        runs without it too.)"""
        order = self._order
        if counts:
            order.forward_next = 1
            return KINDS[0]
        index = getattr(order, "forward_next", None)
        if index is not None:
            order.forward_next = 2 if index == 1 else None  # dispatch, then combine
            return KINDS[index]
        index = getattr(order, "backward_next", 3)
        order.backward_next = 7 - index  # combine (3), then dispatch (4)
        return KINDS[index]

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds


def report_waits(runs: dict[str, tuple[list[dict], list[dict]]]) -> None:
    """Per setting and rank, seconds per step waited on each kind, shaped minus unshaped (`runs`:
    setting -> (unshaped ranks, shaped ranks)); the kinds that never waited are left out."""
    keys = [key for key in wait_keys()
            if any(max(abs(r[f"wait: {key}"]) for r in ranks) >= 0.005 for pair in runs.values() for ranks in pair)]
    print("  where the ranks waited, s per step, shaped - unshaped (columns: "
          + "; ".join(f"{i + 1} {key}" for i, key in enumerate(keys)) + ")")
    print("  setting       rank  " + "".join(f"{i + 1:>7d}" for i in range(len(keys))) + "    sum")
    sums = {}
    for setting, (unshaped, shaped) in runs.items():
        for rank, (u, s) in enumerate(zip(unshaped, shaped)):
            more = [s[f"wait: {key}"] - u[f"wait: {key}"] for key in keys]
            sums[setting, rank] = sum(more)
            print(f"  {setting:12s}  {rank:4d}  " + "".join(f"{x:7.2f}" for x in more) + f"  {sum(more):5.2f}")
    # The waits themselves, beside "exposed" (loop - compute): that one also moves with how much
    # longer or shorter a setting's loop is on unshaped links than the plain one's.
    for setting in runs:
        if setting != "none":
            ratios = [sums[setting, rank] / sums["none", rank] for rank in range(len(runs[setting][0]))]
            print(f"  waited, {setting} / none, range over the ranks: {min(ratios):.2f}-{max(ratios):.2f}")


class _TimedWork:
    """An async collective's work whose `wait` reports how long it took."""

    def __init__(self, work, report):
        self.work, self.report = work, report

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self):
        start = time.perf_counter()
        result = self.work.wait()
        self.report(time.perf_counter() - start)
        return result


def exchanges_alone(runner, collectives, barrier) -> float:
    """The time the link needs for one step's all-to-alls with no compute between them: record every
    exchange of one more step (shapes, splits, group) as it passes the rank's collectives, then
    replay them back to back."""
    import torch
    import torch.distributed as dist

    recorded, exchange = [], collectives.all_to_all_single

    def recording(out, inp, out_splits, in_splits, group=None, async_op=False):
        recorded.append((out.shape, inp.shape, out.dtype, out_splits, in_splits, group))
        return exchange(out, inp, out_splits, in_splits, group=group, async_op=async_op)

    collectives.all_to_all_single = recording  # this object only, for one step
    try:
        runner.forward_backward()
    finally:
        collectives.all_to_all_single = exchange
    buffers = [(torch.zeros(o, dtype=d), torch.zeros(i, dtype=d), os_, is_, g) for o, i, d, os_, is_, g in recorded]
    times = []
    for _ in range(3):
        barrier()
        start = time.perf_counter()
        for out, inp, out_splits, in_splits, group in buffers:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

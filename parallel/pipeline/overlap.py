"""Communication overlap (K2 §2.4): the expert all-to-all of one micro-batch in flight while another
micro-batch computes.

The paired order (parallel/pipeline/schedule_table.py `paired_order`, a pure table). With pp = 1, micro-batch
m+1's forward runs beside micro-batch m's backward: one extra forward (micro-batch 0) warms up,
then the pairs, then backward M-1 drains. With pp > 1 it is the interleaved 1F1B with one more
warm-up forward per rank and its steady state in pairs.

How a pair runs: two tasks taking turns (`Turns`). The forward runs in the calling thread and the
backward (autograd) in a worker thread, but only the task holding the turn runs; the other waits.
Each exchange is issued as an async collective (`async_op=True`; on NCCL it runs on the
communicator's own stream), then the turn goes to the other task, and the exchange is waited on
only when the turn comes back, where its result is needed (the tiny counts exchange keeps the turn:
handing over there would set the other task's long segment beside it and the big exchanges beside
short ones). So one task's all-to-all is on the wire
while the other computes, and nothing runs concurrently on the host: no two threads compete for
the GIL or the cores. In a pipeline, each task also waits for its own received input where it
starts (`Turns.wait_for`): while that input is still on the wire, the other task takes the turn
(on gloo, whose receives report completion only once waited on, a watcher thread waits on each
from the pair's start, `Watched`, so that the question has an answer).
Free-running threads were measured slower than no overlap on gloo; taking turns is what the
DualPipe-style schedules do by hand, here without splitting the model's code into phases.

Weight gradients under the backward's exchange. A backward's segments are about twice a forward's,
so the forward's exchanges hide easily and the backward's do not: the dispatch's backward exchange
would be covered by the forward's shortest segment alone (attention, shared expert, router), and the
forward's next counts exchange would queue behind it on the link. So a paired backward defers the
routed experts' weight gradients (k2train/memory/weight_grads.py): it computes their input
gradients, issues the dispatch's exchange, computes the weight gradients under it, and only then
hands the turn over. The weights' gradients reach them through autograd as before, one exchange
later; the parameter's accumulation order is unchanged. One of a layer's three (`HELD_WGRADS`)
waits one exchange longer, for the combine's backward exchange of the MoE layer below: the segment
before that exchange (the layer's attention backward and the layer below's shared-expert backward)
is the backward's shortest but one, and the forward's next dispatch, issued at the end of the
forward's own short segment (shared expert, attention, router), has only that segment to hide
under. A stage's first MoE layer has no exchange below it: its held gradient is carried to the
next backward's first exchange (`Turns` keeps it), beside the next pair's first dispatch, which
has only that backward's first segment (the last layer's shared-expert backward) to hide under;
the step's last backward's goes at the end of the micro-batch loop (`Turns.flush`). A parameter's
gradients still accumulate in micro-batch order: every backward that touches the experts' weights
issues an exchange before it forms theirs. An unpaired full backward (the pipeline's
cool-down, pp = 1's last) defers them too (`Turns.run_alone`): alone, its dispatch's exchange then
waits only for what they do not cover. A zero-bubble pair's input pass computes no weight
gradients (its weight pass follows the pair), so it defers none.

Collectives of one process group must be issued in the same order on every rank. Each task's own
order is fixed, and the backward's exchanges go over a second EP group of the same ranks
(`backward_expert_group`), so each group sees only forwards or only backwards, in the same order on
every rank, however the two tasks' turns interleave.

What it leaves unchanged. Only the backward task touches gradients, and backwards still run one
after the other in micro-batch order, so gradient accumulation adds in the same order: results are
bit-identical to the plain order. Losses, max logits and expert loads are collected per micro-batch
and summed in micro-batch order after the step.

With pp > 1 the pairs run inside the interleaved 1F1B or zero-bubble schedule
(parallel/pipeline/torch_compat.py `paired_actions`, `overlap_forward_backward`).

With activation offload, a pair's forward packs while its backward fetches; the offloader's
groups are keyed by micro-batch, and a prefetch that runs before the paired forward has ended
fetches what is packed so far, the rest when that backward begins (k2train/memory/offload.py).
Layer scopes are tracked per thread (k2train/memory/saved.py), so the backward's recomputed
forwards do not disturb the byte accounting of the forward beside it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from k2train.memory.weight_grads import deferring_weight_grads, run_deferred_weight_grads, run_weight_grads
from parallel.collectives import Collectives
from parallel.pipeline.schedule_table import paired_order
from parallel.state import ParallelState, my_group


def overlap_runs(overlap: str, ep: int) -> bool:
    """Whether the runtime overlaps the EP all-to-all for this layout (what the plan counts as built)."""
    return overlap != "none" and ep > 1


def check_overlap(overlap: str, ep: int) -> None:
    """Refuse, in one sentence, a layout with nothing to overlap."""
    if overlap != "none" and ep < 2:
        raise ValueError(f"parallel.overlap={overlap} hides the expert all-to-all, but parallel.ep is {ep}: "
                         "there is none to hide; set parallel.overlap=none.")


def backward_expert_group(state: ParallelState) -> Any:
    """A second EP group of the same ranks, for the backward passes' exchanges (every rank calls this)."""
    return my_group(state.layout, "expert", state.rank)


# The experts' weight gradients (of three) a backward's dispatch exchange leaves to its next exchange,
# the combine's of the MoE layer below or the next backward's first (module docstring).
HELD_WGRADS = 1
WATCHERS = 8  # receives watched at once (`Turns.watch`): a pair's two inputs, a few tensors each


class Turns:
    """Two tasks of one rank taking turns: exactly one runs; `hand_over` gives the turn to the other
    and waits until it comes back. Outside a pair, or once the other task has ended, it returns at once.
    `delay_wgrad` (parallel.delay_wgrad): the backward defers its experts' weight gradients to its exchanges.
    `watch_receives` (gloo): a pair's pipeline receives are `watch`ed, so `wait_for` can tell whether
    they have arrived."""

    def __init__(self, delay_wgrad: bool = True, watch_receives: bool = False):
        self.delay_wgrad = delay_wgrad
        self._cond = threading.Condition()
        self._holder: int | None = None
        self._live = [False, False]
        self.hand_overs = 0  # times the turn passed to the other task (a count for tests and reports)
        self.deferred_grads = 0  # expert weight gradients computed under a backward's exchange (the same)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2train-backward")
        self._watchers = _Watchers(WATCHERS) if watch_receives else None
        self._watched = 0  # receives watched in the running pair
        self._carried: list[Callable[[], None]] = []  # weight gradients held past a backward's last exchange

    def hand_over(self) -> None:
        with self._cond:
            me = self._holder
            if me is None or not self._live[1 - me]:
                return
            self._holder = 1 - me
            self.hand_overs += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder == me)

    def paired(self) -> bool:
        """Whether the task holding the turn is in a pair whose other task is still running (a
        forward of the warm-up, a backward of the cool-down, or the tail of a pair's longer task: not)."""
        with self._cond:
            return self._holder is not None and self._live[1 - self._holder]

    def watch(self, works: Sequence[Any]) -> list[Any]:
        """A pair's pipeline receives, as `wait_for` will be given them: with `watch_receives`, each
        waited on by a watcher from now on (`Watched`). Every task waits for its receives before
        its pair ends, so the watchers never hold more than one pair's."""
        if self._watchers is None:
            return list(works)
        self._watched += len(works)
        if self._watched > WATCHERS:
            raise RuntimeError(f"a pair's tasks have {self._watched} pipeline receives; the overlap runtime "
                               f"watches at most {WATCHERS} (parallel/pipeline/overlap.py WATCHERS).")
        return [Watched(work, self._watchers) for work in works]

    def wait_for(self, works: Sequence[Any]) -> None:
        """Wait for `works` (a task's pipeline receives); while they are still pending, the other
        task takes a turn first, so that neither computes nor waits behind the other's input."""
        if not all(work.is_completed() for work in works):
            self.hand_over()
        for work in works:
            work.wait()

    def run_pair(self, first: Callable[[], Any], second: Callable[[], None]) -> Any:
        """Run `first` in this thread and `second` in the worker, taking turns; `first` starts.
        Returns `first`'s result; an error in either is raised here after both have ended."""
        with self._cond:
            self._holder, self._live = 0, [True, True]
        job = self._pool.submit(self._task, 1, self._deferring(second) if self.delay_wgrad else second)
        try:
            return self._task(0, first)
        finally:
            job.result()
            self._watched = 0  # both tasks waited for their receives
            with self._cond:
                self._holder = None

    def run_alone(self, backward: Callable[[], None]) -> None:
        """Run an unpaired full backward (the pipeline's cool-down, or pp = 1's last): with
        `delay_wgrad` its experts' weight gradients are computed under its own dispatch exchanges,
        which then wait only for what the gradients do not cover."""
        (self._deferring(backward) if self.delay_wgrad else backward)()

    def flush(self) -> None:
        """Compute the weight gradients the step's last backward held past its last exchange: at the
        end of the micro-batch loop, before the gradients are reduced."""
        self.deferred_grads += run_weight_grads(self._carried)

    def _deferring(self, backward: Callable[[], None]) -> Callable[[], None]:
        """`backward` with its experts' weight gradients deferred to its exchanges; those held past
        its last exchange carried to the next backward's first (or to `flush`)."""

        def run() -> None:
            with deferring_weight_grads(self._carried):
                backward()

        return run

    def _task(self, me: int, fn: Callable[[], Any]) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._holder == me)
        try:
            return fn()
        finally:
            with self._cond:
                self._live[me] = False
                self._holder = 1 - me if self._live[1 - me] else me
                self._cond.notify_all()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._watchers is not None:
            self._watchers.shutdown()


class Watched:
    """A pipeline receive waited on by a watcher thread from the start of its pair, so that a task
    can ask whether it has arrived without waiting for it. gloo's send and receive works report
    completion only once waited on (`is_completed` is False until then, however long ago the bytes
    came), so `Turns.wait_for` would hand the turn over at every input, arrived or not. NCCL's
    works answer from their CUDA event and are not watched: waiting there orders the caller's
    stream, which must be the task's own. The watchers are a pool that lives with the `Turns`, and
    `is_completed` answers at once: a thread started per receive, with a task waiting up to a
    millisecond for its answer, made the overlapped loop about a tenth slower on this project's CPU
    benchmark, whose ranks run on a CPU quota."""

    __slots__ = ("_work", "_arrived", "_error")

    def __init__(self, work: Any, watchers: _Watchers):
        self._work, self._arrived = work, threading.Event()
        self._error: BaseException | None = None
        watchers.submit(self)

    def watch(self) -> None:
        """In a watcher thread: wait for the receive, then let go of it (and of its buffer) before
        telling the task."""
        work, self._work = self._work, None
        try:
            work.wait()
        except BaseException as error:  # raised where the task waits (`wait`)
            self._error = error
        finally:
            del work
            self._arrived.set()

    def is_completed(self) -> bool:
        return self._arrived.is_set()

    def wait(self) -> None:
        self._arrived.wait()
        if self._error is not None:
            raise self._error


class _Watchers:
    """Daemon threads running `Watched` waits: a receive whose peer has died must not hold the
    process at exit (a ThreadPoolExecutor's threads are joined there)."""

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        for i in range(threads):
            threading.Thread(target=self._serve, name=f"k2train-receive-{i}", daemon=True).start()

    def submit(self, watched: Watched) -> None:
        self._queue.put(watched)

    def shutdown(self) -> None:
        for _ in range(self._threads):
            self._queue.put(None)

    def _serve(self) -> None:
        while (watched := self._queue.get()) is not None:
            watched.watch()


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
               group: Any, turns: Turns | None, collectives: Collectives, backward: bool = False,
               held: int = 0) -> None:
    """all_to_all_single into `out`; with `turns`, issued async and waited on after the other task's
    turn (a `backward` exchange after the weight gradients deferred before it, but for the `held`
    queued last, which wait for the backward's next exchange)."""
    if turns is None:
        collectives.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        return
    work = collectives.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
    if backward:  # the experts' weight gradients deferred before it run under it, before the turn passes
        turns.deferred_grads += run_deferred_weight_grads(keep=held)
    turns.hand_over()
    work.wait()


def run_micro_batches(forward: Callable[[int], Any], backward: Callable[[Any], None], microbatches: int,
                      turns: Turns | None) -> list[Any]:
    """Run `forward(m)` and `backward(result of forward m)` for every micro-batch, one after the
    other, or (with `turns`) in the paired order, each backward taking turns with the next forward.
    Returns the forwards' results in micro-batch order."""
    results: list[Any] = []
    if turns is None:
        for m in range(microbatches):
            results.append(forward(m))
            backward(results[m])
        return results
    for step in paired_order(1, 1, microbatches, 0):
        forwards = [op.microbatch for op in step if op.kind == "F"]
        backwards = [op.microbatch for op in step if op.kind == "B"]
        if forwards and backwards:
            previous = results[backwards[0]]
            results.append(turns.run_pair(lambda m=forwards[0]: forward(m), lambda r=previous: backward(r)))
        elif forwards:
            results.append(forward(forwards[0]))
        else:
            turns.run_alone(lambda r=results[backwards[0]]: backward(r))
    turns.flush()
    return results

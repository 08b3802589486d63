"""Communication overlap (K2 §2.4): the expert all-to-all of one micro-batch in flight while another
micro-batch computes.

The paired order. Micro-batch m's forward runs beside micro-batch m-1's backward: one extra forward
(micro-batch 0) warms up, then every step pairs forward m+1 with backward m, and backward M-1
drains. `paired_order` is that order as a pure table; its test checks it is a valid schedule
(every backward after its forward, forwards and backwards each in micro-batch order).

How a pair runs. The backward (autograd) runs in a worker thread while the forward runs in the
calling thread; torch's kernels, autograd's engine and gloo's waits release the GIL, so while one
thread waits on its all-to-all the other computes. Collectives of one process group must be issued
in the same order on every rank, and two threads interleave arbitrarily, so the backward's
exchanges go over a second EP group of the same ranks (`backward_expert_group`): each group then
sees only forwards, or only backwards, each in micro-batch and layer order on every rank. Chosen
over async collectives with a hand-written phase interleave because it keeps the model code as it
is (the exchange stays one differentiable call) and on NCCL each group has its own stream.

What it leaves unchanged. Only the backward thread touches gradients, and backwards still run one
after the other in micro-batch order, so gradient accumulation (parallel/zero1.py's hooks) adds in
the same order: results are bit-identical to the plain order. Losses, max logits and expert loads
are collected per micro-batch and summed in micro-batch order after the step. Saved-tensor hooks
are thread-local: they are installed by the forward in the thread that runs it, and unpacking
goes with the saved tensor, so activation accounting holds.

Not built yet: the pipeline pairing (pp > 1, where torch's `OVERLAP_F_B` actions would carry it)
and overlap with activation offload; both are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from parallel.schedule_table import Op
from parallel.state import ParallelState, _my_group


def paired_order(microbatches: int) -> list[tuple[Op, ...]]:
    """The steps of the pp = 1 overlapped order: F0, then (F m+1 | B m), then B M-1."""
    if microbatches < 1:
        raise ValueError(f"the paired order needs at least one micro-batch, got {microbatches}.")
    steps: list[tuple[Op, ...]] = [(Op("F", 0, 0),)]
    steps += [(Op("F", 0, m + 1), Op("B", 0, m)) for m in range(microbatches - 1)]
    steps.append((Op("B", 0, microbatches - 1),))
    return steps


def check_overlap(overlap: str, pp: int, ep: int, activation_offload: bool) -> None:
    """Refuse, in one sentence, a layout the overlapped schedule cannot run yet."""
    if overlap == "none":
        return
    if ep < 2:
        raise ValueError(f"parallel.overlap={overlap} hides the expert all-to-all, but parallel.ep is {ep}: "
                         "there is none to hide; set parallel.overlap=none.")
    if pp > 1:
        raise NotImplementedError(f"parallel.overlap={overlap} runs with parallel.pp=1 only so far (got pp={pp}): "
                                  "the pairing inside the interleaved pipeline schedule is not built yet.")
    if activation_offload:
        raise NotImplementedError(f"parallel.overlap={overlap} with memory.activation_offload=true is not "
                                  "supported yet: the offloader's prefetch assumes one pass at a time.")


def backward_expert_group(state: ParallelState) -> Any:
    """A second EP group of the same ranks, for the backward passes' exchanges (every rank calls this)."""
    return _my_group(state.layout, "expert", state.rank)


def run_micro_batches(forward: Callable[[int], Any], backward: Callable[[Any], None], microbatches: int,
                      paired: bool) -> list[Any]:
    """Run `forward(m)` and `backward(result of forward m)` for every micro-batch, one after the
    other, or in the paired order with each backward in a worker thread beside the next forward.
    Returns the forwards' results in micro-batch order."""
    results: list[Any] = []
    if not paired:
        for m in range(microbatches):
            results.append(forward(m))
            backward(results[m])
        return results
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2train-backward") as pool:
        for step in paired_order(microbatches):
            forwards = [op.microbatch for op in step if op.kind == "F"]
            backwards = [op.microbatch for op in step if op.kind == "B"]
            job = pool.submit(backward, results[backwards[0]]) if backwards else None
            try:
                if forwards:
                    results.append(forward(forwards[0]))
            finally:
                if job is not None:
                    job.result()
    return results

"""The interleaved 1F1B schedule as a pure table (Narayanan et al. 2021, arXiv 2104.04473; the
order Megatron-LM runs), and its pipeline bubble.

Each pipeline rank r of p holds v virtual stages (r, r+p, ...). Micro-batches go through the stages
in groups of p; rank r first runs (p - r - 1)·2 + (v - 1)·p warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. Simulating that order on a clock
where every forward or backward of one virtual stage takes one step, and a result is usable by the
next stage one step later, gives each rank's time line with its idle steps. With m a multiple of p
the bubble is exactly (p - 1) / (v·m) of the busy time, the paper's figure.
"""

from __future__ import annotations

from typing import NamedTuple


class Op(NamedTuple):
    kind: str  # "F" forward, "B" backward
    stage: int
    microbatch: int


def rank_order(pp: int, vp: int, microbatches: int, rank: int) -> list[Op]:
    """The compute operations of pipeline rank `rank`, in the order it runs them."""
    return [op for step in _rank_steps(pp, vp, microbatches, rank, extra_warmup=0) for op in step]


def paired_order(pp: int, vp: int, microbatches: int, rank: int) -> list[tuple[Op, ...]]:
    """Rank `rank`'s order with communication overlap (K2 §2.4): one more warm-up forward than
    `rank_order`, then each forward of the steady state paired with the backward after it, to run
    as one action (each one's expert all-to-all in flight while the other computes), then the
    remaining backwards. The extra warm-up forward is what makes every pair independent: without
    it, a rank's last stage would pair a micro-batch's forward with its own backward."""
    return _rank_steps(pp, vp, microbatches, rank, extra_warmup=1)


def _rank_steps(pp: int, vp: int, microbatches: int, rank: int, extra_warmup: int) -> list[tuple[Op, ...]]:
    """Warm-up forwards, steady-state (forward, backward) pairs, drain backwards."""
    total = microbatches * vp
    warmup = min((pp - rank - 1) * 2 + (vp - 1) * pp + extra_warmup, total)

    def stage(k: int, forward: bool) -> int:
        chunk = (k % (pp * vp)) // pp
        return (chunk if forward else vp - 1 - chunk) * pp + rank

    def microbatch(k: int) -> int:
        return (k // (pp * vp)) * pp + k % pp

    steps: list[tuple[Op, ...]] = [(Op("F", stage(k, True), microbatch(k)),) for k in range(warmup)]
    steps += [(Op("F", stage(warmup + k, True), microbatch(warmup + k)), Op("B", stage(k, False), microbatch(k)))
              for k in range(total - warmup)]
    steps += [(Op("B", stage(k, False), microbatch(k)),) for k in range(total - warmup, total)]
    return steps


def paired_timeline(pp: int, vp: int, microbatches: int) -> dict[int, list[tuple[Op, ...] | None]]:
    """Every rank's time line of `paired_order` (a pair takes one clock step; None: waiting). A pair
    starts when all its operations' inputs are ready; raises if the orders cannot finish."""
    orders = {r: paired_order(pp, vp, microbatches, r) for r in range(pp)}
    return _simulate(orders, pp * vp, 4 * (pp + 2 * vp * microbatches))


def _dependencies(op: Op, num_stages: int) -> list[Op]:
    if op.kind == "F":
        return [Op("F", op.stage - 1, op.microbatch)] if op.stage > 0 else []
    deps = [Op("F", op.stage, op.microbatch)]
    if op.stage < num_stages - 1:
        deps.append(Op("B", op.stage + 1, op.microbatch))
    return deps


def timeline(pp: int, vp: int, microbatches: int) -> dict[int, list[Op | None]]:
    """Every rank's time line: at each clock step the op it runs, or None when it waits."""
    orders = {r: [(op,) for op in rank_order(pp, vp, microbatches, r)] for r in range(pp)}
    lines = _simulate(orders, pp * vp, 4 * (pp + 2 * vp * microbatches))
    return {r: [None if step is None else step[0] for step in line] for r, line in lines.items()}


def _simulate(orders: dict[int, list[tuple[Op, ...]]], num_stages: int, limit: int) -> dict[int, list]:
    """Run every rank's steps on a clock: a step runs once all its ops' inputs finished in an earlier
    step (an op may not need another op of its own step)."""
    pp = len(orders)
    finished: dict[Op, int] = {}
    lines: dict[int, list] = {r: [] for r in range(pp)}
    step = 0
    while any(len(lines[r]) - lines[r].count(None) < len(orders[r]) for r in range(pp)):
        ran = {}
        for r in range(pp):
            done = len(lines[r]) - lines[r].count(None)
            if done == len(orders[r]):
                continue
            ops = orders[r][done]
            ready = all(finished.get(dep, step) < step for op in ops for dep in _dependencies(op, num_stages))
            ran[r] = ops if ready else None
        for r, ops in ran.items():
            lines[r].append(ops)
            for op in ops or ():
                finished[op] = step
        step += 1
        if step > limit:
            raise RuntimeError(f"the pipeline schedule of {pp} ranks and {num_stages} stages does not finish.")
    return lines


def bubble_fraction(lines: dict[int, list[Op | None]]) -> float:
    """Idle time over busy time of the slowest rank's run: (makespan - busy) / busy."""
    makespan = max(len(line) for line in lines.values())
    busy = max(len(line) - line.count(None) for line in lines.values())
    return (makespan - busy) / busy

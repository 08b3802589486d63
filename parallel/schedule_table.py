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
    total = microbatches * vp
    warmup = min((pp - rank - 1) * 2 + (vp - 1) * pp, total)

    def stage(k: int, forward: bool) -> int:
        chunk = (k % (pp * vp)) // pp
        return (chunk if forward else vp - 1 - chunk) * pp + rank

    def microbatch(k: int) -> int:
        return (k // (pp * vp)) * pp + k % pp

    ops = [Op("F", stage(k, True), microbatch(k)) for k in range(warmup)]
    for k in range(total - warmup):
        ops.append(Op("F", stage(warmup + k, True), microbatch(warmup + k)))
        ops.append(Op("B", stage(k, False), microbatch(k)))
    ops += [Op("B", stage(k, False), microbatch(k)) for k in range(total - warmup, total)]
    return ops


def _dependencies(op: Op, num_stages: int) -> list[Op]:
    if op.kind == "F":
        return [Op("F", op.stage - 1, op.microbatch)] if op.stage > 0 else []
    deps = [Op("F", op.stage, op.microbatch)]
    if op.stage < num_stages - 1:
        deps.append(Op("B", op.stage + 1, op.microbatch))
    return deps


def timeline(pp: int, vp: int, microbatches: int) -> dict[int, list[Op | None]]:
    """Every rank's time line: at each clock step the op it runs, or None when it waits."""
    orders = {r: rank_order(pp, vp, microbatches, r) for r in range(pp)}
    finished: dict[Op, int] = {}
    lines: dict[int, list[Op | None]] = {r: [] for r in range(pp)}
    step = 0
    limit = 4 * (pp + 2 * vp * microbatches)
    while any(len(lines[r]) - lines[r].count(None) < len(orders[r]) for r in range(pp)):
        ran = {}
        for r in range(pp):
            done = len(lines[r]) - lines[r].count(None)
            if done == len(orders[r]):
                continue
            op = orders[r][done]
            ready = all(finished.get(dep, step) < step for dep in _dependencies(op, pp * vp))
            ran[r] = op if ready else None
        for r, op in ran.items():
            lines[r].append(op)
            if op is not None:
                finished[op] = step
        step += 1
        if step > limit:
            raise RuntimeError(f"interleaved schedule for pp={pp} vp={vp} m={microbatches} does not finish.")
    return lines


def bubble_fraction(lines: dict[int, list[Op | None]]) -> float:
    """Idle time over busy time of the slowest rank's run: (makespan - busy) / busy."""
    makespan = max(len(line) for line in lines.values())
    busy = max(len(line) - line.count(None) for line in lines.values())
    return (makespan - busy) / busy

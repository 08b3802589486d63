"""The communication the runtime leaves exposed under compute, as built (`k2train plan`'s step as built).

The EP all-to-all with parallel.overlap=ep (`paired_exposed_s`, K2 §2.4).

The runtime (parallel/pipeline/overlap.py) runs a rank's schedule as `schedule_table.paired_order`:
warm-up forwards alone, then pairs of one forward and one backward taking turns, then the cool-down
backwards alone. What that hides, step by step:
- an operation that runs alone waits for each of its exchanges in full: nothing else is there to run;
- in a pair, one task's exchanges are in flight while the other computes, so the forward's
  exchanges hide under the backward's compute and the backward's under the forward's, each only up
  to that compute. A backward computes about twice what a forward does and exchanges as many bytes,
  so at a slow link the backward's exchanges are the first to show. The model counts the pair's
  compute as a whole; the runtime earns that by computing a paired backward's expert weight
  gradients under its dispatch's exchange (overlap.py), without which that exchange would be
  covered by the forward's shortest segment alone.
Summed over the rank's steps, that is the EP time the plan adds to the rank's compute as built
(planner.py `_exposed_as_built`). The ideal (K2's accounting) hides all of it under compute.

The pipeline's sends (`input_waits`). In the steady state of the interleaved 1F1B every rank needs
the output of the other rank's previous step (schedule_table.py `_simulate`: no step has slack), so
each step that takes its input from another rank waits for that input's transfer, with or without
pairs. The ideal counts the sends as hidden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from parallel.pipeline.schedule_table import Op


def paired_exposed_s(steps: Sequence[tuple[Op, ...]], forward_s: Mapping[int, float], backward_s: Mapping[int, float],
                     exchange_s: Mapping[int, float]) -> float:
    """Seconds a pipeline rank waits on the EP all-to-all over its `steps` in the paired order
    (`schedule_table.paired_order`), given per stage the compute of one micro-batch's forward and
    backward and the link time of one micro-batch's exchanges in either direction (the forward's
    dispatch and combine, or their transposes)."""
    exposed = 0.0
    for step in steps:
        if len(step) == 1:
            exposed += exchange_s[step[0].stage]
            continue
        forward, backward = step
        exposed += max(exchange_s[forward.stage] - backward_s[backward.stage], 0.0)
        exposed += max(exchange_s[backward.stage] - forward_s[forward.stage], 0.0)
    return exposed


def input_waits(steps: Sequence[tuple[Op, ...]], num_stages: int, pp: int) -> int:
    """How many of a pipeline rank's `steps` (a pair is one step) wait for an input from another
    rank: a forward past the first stage or a backward before the last; none with one rank."""
    if pp == 1:
        return 0
    last = num_stages - 1
    return sum(1 for step in steps if any(op.stage > 0 if op.kind == "F" else op.stage < last for op in step))

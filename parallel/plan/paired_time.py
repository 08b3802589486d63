"""How much of the EP all-to-all the paired runtime leaves exposed (parallel.overlap=ep, K2 §2.4).

The runtime (parallel/pipeline/overlap.py) runs a rank's schedule as `schedule_table.paired_order`:
warm-up forwards alone, then pairs of one forward and one backward taking turns, then the cool-down
backwards alone. What that hides, step by step:
- an operation that runs alone waits for each of its exchanges in full: nothing else is there to run;
- in a pair, one task's exchanges are in flight while the other computes, so the forward's
  exchanges hide under the backward's compute and the backward's under the forward's, each only up
  to that compute. A backward computes about twice what a forward does and exchanges as many bytes,
  so at a slow link the backward's exchanges are the first to show.
Summed over the rank's steps, that is the EP time the plan adds to the rank's compute as built
(planner.py `_exposed_as_built`). The ideal (K2's accounting) hides all of it under compute.
"""

from __future__ import annotations

from collections.abc import Mapping

from parallel.pipeline.schedule_table import paired_order


def paired_exposed_s(pp: int, vp: int, micro_batches: int, rank: int, forward_s: Mapping[int, float],
                     backward_s: Mapping[int, float], exchange_s: Mapping[int, float]) -> float:
    """Seconds pipeline rank `rank` waits on the EP all-to-all in the paired order, given per stage
    the compute of one micro-batch's forward and backward and the link time of one micro-batch's
    exchanges in either direction (the forward's dispatch and combine, or their transposes)."""
    exposed = 0.0
    for step in paired_order(pp, vp, micro_batches, rank):
        if len(step) == 1:
            exposed += exchange_s[step[0].stage]
            continue
        forward, backward = step
        exposed += max(exchange_s[forward.stage] - backward_s[backward.stage], 0.0)
        exposed += max(exchange_s[backward.stage] - forward_s[forward.stage], 0.0)
    return exposed

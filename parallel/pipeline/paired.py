"""Communication overlap inside the pipeline schedule (K2 §2.4, "communication overlap with
interleaved 1F1B"): in the steady state a forward and a backward of two different (stage,
micro-batch) pairs run as one action, taking turns (parallel/pipeline/overlap.py `Turns`), so that each
one's expert all-to-all is in flight while the other computes.

The order is schedule_table.py's `paired_order`: one more warm-up forward per rank than the plain
interleaved 1F1B, then forward/backward pairs. With the zero-bubble schedule each backward is split
(K2 §2.4): the pair runs the forward beside the input-gradient pass, and the weight-gradient pass
of that micro-batch follows the pair as its own action, so the input gradient's pipeline send is
in flight while the weight gradients are computed. torch's runtime carries a pair as an `OVERLAP_F_B`
action whose two sub-actions it lowers to sends and receives like any others (the receives of both
are posted before the pair, the sends of both after it). The function registered for
`OVERLAP_F_B` does what the runtime does for a lone forward and a lone backward, split between the
two turns: wait for the received inputs, run the stage's chunk, compute or fetch the loss, count
the backward. That is the one place that reads the runtime's private state (`fwd_recv_ops`,
`bwd_recv_ops`, `backward_counter`, the loss helpers), because torch passes a custom function only
the action and a context; the rest of the runtime stays torch's.
"""

from __future__ import annotations

from torch.distributed.pipelining.schedules import (
    _Action,
    _ComputationType,
    _PipelineContext,
    _wait_batch_p2p,
)

from parallel.pipeline.overlap import Turns
from parallel.pipeline.schedule_table import paired_order

_FORWARD, _FULL, _INPUT, _WEIGHT = (_ComputationType.FORWARD, _ComputationType.FULL_BACKWARD,
                                    _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT)


def paired_actions(pp: int, vp: int, microbatches: int, rank: int, split_backward: bool) -> list[_Action]:
    """Rank `rank`'s compute actions in the paired order: pairs as OVERLAP_F_B with their two
    sub-actions; with `split_backward`, each backward as its input-gradient pass (in the pair) and
    its weight-gradient pass right after."""
    actions: list[_Action] = []
    for step in paired_order(pp, vp, microbatches, rank):
        ops = [_Action(op.stage, _FORWARD if op.kind == "F" else _INPUT if split_backward else _FULL, op.microbatch)
               for op in step]
        actions.append(ops[0] if len(ops) == 1 else _Action(-1, _ComputationType.OVERLAP_F_B, None, tuple(ops)))
        if split_backward and step[-1].kind == "B":
            actions.append(_Action(step[-1].stage, _WEIGHT, step[-1].microbatch))
    return actions


def overlap_forward_backward(turns: Turns):
    """The runtime's function for an OVERLAP_F_B action: the forward in this thread, the backward
    taking turns with it (parallel/pipeline/overlap.py)."""

    def run(action: _Action, ctx: _PipelineContext) -> None:
        schedule = ctx.schedule_ref
        forward, backward = action.sub_actions
        stages = {stage.stage_index: stage for stage in schedule._stages}
        f_stage, b_stage = stages[forward.stage_index], stages[backward.stage_index]
        f_mb, b_mb = forward.microbatch_index, backward.microbatch_index
        # Both inputs were received before the pair (the looped placement has no two adjacent
        # stages on one rank when pp > 1, so every input comes over the pipeline group).
        if not f_stage.is_first:
            _wait_batch_p2p(schedule.fwd_recv_ops.pop((forward.stage_index, f_mb)))
        if not b_stage.is_last:
            _wait_batch_p2p(schedule.bwd_recv_ops.pop((backward.stage_index, b_mb)))

        def run_forward() -> None:
            output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb], save_forward_output=False)
            schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)

        def run_backward() -> None:
            loss = schedule._maybe_get_loss(b_stage, b_mb)
            if backward.computation_type == _INPUT:  # its weight-gradient pass is counted when it runs
                b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=False, last_backward=False)
                return
            schedule.backward_counter[backward.stage_index] += 1
            last = schedule.backward_counter[backward.stage_index] == schedule._n_microbatches
            b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last)

        turns.run_pair(run_forward, run_backward)

    return run

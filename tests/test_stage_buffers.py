"""Pipeline receive buffers live only while their micro-batch needs them (parallel/pipeline/buffers.py).

- The linear-time UNSHARD/RESHARD pass equals torch's own, so the planner lowers the interleaved
  1F1B table exactly as the runtime does.
- On a PP2 x VP2 gloo world with 16 micro-batches, under both schedules we ship, the most receive
  buffers alive at once (by storage weak references: memory actually held, whoever holds it) is,
  per stage and kind and for the rank, exactly the count of the walk over the runtime's lowered
  actions, and far below one per micro-batch; none is alive after a step, and every descriptor is
  back to its meta placeholder.
"""

from __future__ import annotations

import pytest

from multiproc import run_world, tiny_rank
from parallel.pipeline.schedule_table import rank_order, timeline
from parallel.pipeline.buffers import interleaved_1f1b_actions
from parallel.pipeline.torch_compat import to_action, torch_add_unshard_reshard, with_unshard_reshard

PP, VP, MICRO_BATCHES = 2, 2, 16
# 16 micro-batches of one 16-token sequence on one sequence rank; one layer per virtual stage.
OVERRIDES = [
    "model.num_layers=4", "data.seq_len=16", "train.micro_batch_size=1", "train.global_batch_tokens=256",
    f"parallel.pp={PP}", f"parallel.vp={VP}", "parallel.ep=1", "parallel.dp=1",
    "logging.wandb=false", "logging.progress_bar=false", "logging.plots=false",
]


@pytest.mark.parametrize("pp,vp,m", [(2, 2, 8), (4, 2, 8), (4, 4, 8), (3, 5, 6), (8, 2, 32)])
def test_unshard_reshard_pass_equals_torchs(pp, vp, m):
    """On the table's order, and on the time line with its idle steps (what the runtime is given)."""
    orders = interleaved_1f1b_actions(pp, vp, m)
    with_idle = {rank: [None if op is None else to_action(op) for op in line]
                 for rank, line in timeline(pp, vp, m).items()}
    for rank in range(pp):
        for actions in (orders[rank], with_idle[rank]):
            for active in (1, 3):
                assert with_unshard_reshard(actions, active) == torch_add_unshard_reshard(list(actions), active)


def measure_rank(payload: dict) -> dict:
    """One rank: two steps of the runner; the receive buffers its log saw, and the runtime's actions."""
    import torch

    cfg, state, runner = tiny_rank(payload["overrides"], payload["data"])
    stages = runner.stages
    log = runner.receive_log
    steps = []
    for _ in range(2):
        log.reset()
        runner.forward_backward()
        infos = [info for stage in stages for table in (stage.args_recv_info, stage.grad_recv_info)
                 for chunk in table.values() for info in chunk]
        steps.append(dict(peak=log.peak, allocations=log.allocations, alive_after=log.alive(),
                          real_after=sum(i.buffer is not None and not i.buffer.is_meta for i in infos)))
    pp_rank = state.coords.pp
    result = dict(pp=pp_rank, micro_batches=runner.micro_batches, steps=steps,
                  lowered=runner.schedule.pipeline_order_with_comms[pp_rank],
                  stages=[s.stage_index for s in stages], shared_log=all(s.log is log for s in stages))
    torch.distributed.destroy_process_group()
    return result


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zero_bubble"])
def test_receive_buffers_live_only_while_in_flight(schedule, data):
    from parallel.pipeline.buffers import interleaved_1f1b_peaks, receive_buffer_peak
    from parallel.pipeline.torch_compat import lower

    ranks = run_world(PP, "test_stage_buffers:measure_rank",
                      dict(overrides=OVERRIDES + [f"parallel.schedule={schedule}"], data=data))
    lowered_1f1b = lower(interleaved_1f1b_actions(PP, VP, MICRO_BATCHES), PP, PP * VP, MICRO_BATCHES)
    for got in ranks:
        assert got["micro_batches"] == MICRO_BATCHES and got["shared_log"]
        expected = receive_buffer_peak(got["lowered"])
        if schedule == "interleaved_1f1b":
            # The planner lowers the table as the runtime does: the same actions, so the same peaks.
            assert got["lowered"] == lowered_1f1b[got["pp"]]
            assert interleaved_1f1b_peaks(PP, VP, MICRO_BATCHES)[got["pp"]] == expected
            # An input between its stage's forward and backward needs its buffer; the walk counts
            # those and the inputs already received for a forward still to come.
            for stage, forwarded in _forwarded_not_backwarded(got["pp"]).items():
                if stage > 0:
                    assert expected.by_stage[(stage, "input")] >= forwarded
        receiving = ([(s, "input") for s in got["stages"] if s > 0]
                     + [(s, "grad") for s in got["stages"] if s < PP * VP - 1])
        assert set(expected.by_stage) == set(receiving)
        for step in got["steps"]:
            peak = step["peak"]
            # Every receive allocated once, when posted: a buffer per receiving stage and micro-batch.
            assert step["allocations"] == len(receiving) * MICRO_BATCHES
            assert (peak.count, peak.inputs, peak.grads) == (expected.count, expected.inputs, expected.grads), got["pp"]
            assert peak.by_stage == expected.by_stage, got["pp"]
            assert all(n < MICRO_BATCHES for n in peak.by_stage.values())
            assert peak.count < MICRO_BATCHES
            assert step["alive_after"] == [] and step["real_after"] == 0


def _forwarded_not_backwarded(rank: int) -> dict[int, int]:
    """Per stage of `rank`, the most micro-batches between forward and backward (the table's order)."""
    count, most = {}, {}
    for op in rank_order(PP, VP, MICRO_BATCHES, rank):
        count[op.stage] = count.get(op.stage, 0) + (1 if op.kind == "F" else -1)
        most[op.stage] = max(most.get(op.stage, 0), count[op.stage])
    return most

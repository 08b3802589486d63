"""The interleaved 1F1B table: every operation once, dependencies respected, the paper's bubble."""

from __future__ import annotations

import pytest

from parallel.pipeline.schedule_table import Op, bubble_fraction, rank_order, timeline


@pytest.mark.parametrize("pp,vp,m", [(2, 1, 4), (2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 3, 12), (8, 2, 16), (16, 2, 32)])
def test_bubble_is_the_interleaved_1f1b_theory(pp, vp, m):
    assert bubble_fraction(timeline(pp, vp, m)) == pytest.approx((pp - 1) / (vp * m))


@pytest.mark.parametrize("pp,vp,m", [(2, 2, 4), (4, 2, 8), (4, 1, 4)])
def test_every_operation_runs_once_after_its_inputs(pp, vp, m):
    lines = timeline(pp, vp, m)
    when = {}
    for rank, line in lines.items():
        for step, op in enumerate(line):
            if op is not None:
                assert op.stage % pp == rank
                assert op not in when
                when[op] = step
    stages = pp * vp
    assert len(when) == 2 * stages * m
    for op, step in when.items():
        if op.kind == "F" and op.stage > 0:
            assert when[Op("F", op.stage - 1, op.microbatch)] < step
        if op.kind == "B":
            assert when[Op("F", op.stage, op.microbatch)] < step
            if op.stage < stages - 1:
                assert when[Op("B", op.stage + 1, op.microbatch)] < step


def test_warmup_grows_toward_the_first_rank():
    """Rank r runs (p - r - 1)·2 + (v - 1)·p forwards before its first backward."""
    pp, vp, m = 4, 2, 8
    for rank in range(pp):
        order = rank_order(pp, vp, m, rank)
        first_backward = next(i for i, op in enumerate(order) if op.kind == "B")
        assert first_backward == (pp - rank - 1) * 2 + (vp - 1) * pp + 1

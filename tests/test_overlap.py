"""Communication overlap (parallel/overlap.py): the paired order is a valid schedule, layouts it
cannot run are refused, and on gloo the overlapped step gives bit for bit the plain step's losses,
max logits, expert loads and reduced gradients (backwards keep their order, so every addition does).
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_world
from parallel.overlap import check_overlap, paired_order
from parallel.schedule_table import Op
from test_parallel_training import BASE, data, layout_overrides  # noqa: F401 (data is a fixture)


@pytest.mark.parametrize("microbatches", [1, 2, 5])
def test_paired_order_is_a_valid_schedule(microbatches):
    steps = paired_order(microbatches)
    done: set[Op] = set()
    for step in steps:
        kinds = [op.kind for op in step]
        assert len(step) in (1, 2) and len(set(kinds)) == len(kinds)  # at most one F and one B per pair
        for op in step:
            if op.kind == "B":  # its forward finished in an earlier step, not beside it
                assert Op("F", 0, op.microbatch) in done
        done.update(step)
    forwards = [op.microbatch for step in steps for op in step if op.kind == "F"]
    backwards = [op.microbatch for step in steps for op in step if op.kind == "B"]
    assert forwards == backwards == list(range(microbatches))
    # The steady state pairs forward m+1 with backward m: all but the first and last steps are pairs.
    assert sum(len(step) == 2 for step in steps) == microbatches - 1


def test_layouts_it_cannot_run_are_refused():
    check_overlap("none", 4, 1, True)
    check_overlap("ep", 1, 4, False)
    with pytest.raises(ValueError, match="parallel.ep is 1"):
        check_overlap("ep", 1, 1, False)
    with pytest.raises(NotImplementedError, match="pp=1 only"):
        check_overlap("ep", 2, 2, False)
    with pytest.raises(NotImplementedError, match="activation_offload"):
        check_overlap("ep", 1, 2, True)


def test_config_rejects_unknown_overlap():
    from pathlib import Path

    from k2train.config.load import load_config

    with pytest.raises(Exception, match="parallel.overlap"):
        load_config(Path(__file__).parents[1] / "configs" / "k2_tiny.yaml", ["parallel.overlap=everything"])


def test_pp1_ep4_overlap_matches_plain_bit_for_bit(data):
    layout = BASE + layout_overrides(1, 1, 4, 1)
    plain = run_world(4, "test_parallel_training:run_steps", dict(overrides=layout, data=data))
    overlapped = run_world(4, "test_parallel_training:run_steps",
                           dict(overrides=layout + ["parallel.overlap=ep"], data=data))
    for rank, (want, got) in enumerate(zip(plain, overlapped, strict=True)):
        for step, (w, g) in enumerate(zip(want["steps"], got["steps"], strict=True), start=1):
            assert g["loss"] == w["loss"], (rank, step)
            assert g["norm"] == w["norm"], (rank, step)
            assert torch.equal(g["max_logits"], w["max_logits"]), (rank, step)
            assert torch.equal(g["counts"], w["counts"]), (rank, step)
            assert g["grads"].keys() == w["grads"].keys()
            for key, grad in g["grads"].items():
                assert torch.equal(grad, w["grads"][key]), (rank, step, key)
        for name, param in got["params"].items():
            assert torch.equal(param, want["params"][name]), (rank, name)

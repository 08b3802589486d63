"""The cost-balanced pipeline split (parallel/pipeline/split.py), without processes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from k2train.config.load import load_config
from parallel.plan.planner import make_plan
from parallel.plan.cost import HARDWARE
from parallel.pipeline.split import SplitError, balance, choose_split, rank_costs, split_layers
from parallel.layout import layout_for

ROOT = Path(__file__).parents[1]


def _brute_force(layer_costs, head_cost, num_stages, pp, head_only):
    """The least busiest-rank cost over every split (small cases only)."""
    n, best = len(layer_costs), None
    for cuts in itertools.combinations_with_replacement(range(n + 1), num_stages - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, n))]
        if min(counts[:-1], default=1) < 1 or counts[-1] < (0 if head_only else 1):
            continue
        busiest = max(rank_costs(counts, pp, layer_costs, head_cost))
        best = busiest if best is None else min(best, busiest)
    return best


@pytest.mark.parametrize(("layer_costs", "head_cost", "num_stages", "pp"), [
    ([5, 8, 8, 8, 8, 8, 8, 8], 16, 4, 4),
    ([5, 8, 8, 8, 8, 8, 8, 8], 16, 4, 2),
    ([3] + [7] * 9, 40, 4, 2),
    ([1] * 7, 2, 4, 4),
    ([10, 1, 1, 1, 1, 10], 3, 3, 3),
])
def test_balance_reaches_the_least_busiest_rank(layer_costs, head_cost, num_stages, pp):
    counts = balance(layer_costs, head_cost, num_stages, pp, head_only=True)
    assert sum(counts) == len(layer_costs) and min(counts[:-1]) >= 1 and counts[-1] >= 0
    got = max(rank_costs(counts, pp, layer_costs, head_cost))
    assert got == _brute_force(layer_costs, head_cost, num_stages, pp, head_only=True)
    even = [len(r) for r in split_layers(len(layer_costs), num_stages)]
    assert got <= max(rank_costs(even, pp, layer_costs, head_cost))


def test_a_heavy_head_gets_a_stage_of_its_own():
    assert balance([1] * 6, 100, 3, 3, head_only=True) == [3, 3, 0]
    assert balance([1] * 6, 100, 3, 3, head_only=False)[-1] == 1


def test_impossible_splits_are_refused_in_one_sentence():
    with pytest.raises(SplitError, match=r"^2 layers cannot fill 4 pipeline stages; each stage needs a layer \(the last"):
        balance([1, 1], 1, 4, 2, head_only=True)
    with pytest.raises(SplitError, match=r"^6 pipeline stages cannot be spread over 4 pipeline ranks"):
        balance([1] * 8, 1, 6, 4)


def test_stage_layers_override_the_balanced_split():
    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", ["parallel.pp=2", "parallel.vp=1", "parallel.dp=null",
                                                          "parallel.stage_layers=[4,0]"])
    assert choose_split(cfg, 2, 2) == [range(0, 4), range(4, 4)]
    with pytest.raises(SplitError, match=r"parallel.stage_layers \[4, 0\] must give each of the 3 stages"):
        choose_split(cfg, 3, 3)


def test_k2_plan_is_balanced_within_five_percent():
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml")
    plan = make_plan(cfg, layout_for(cfg, 256), HARDWARE["h800"])
    compute = [r.compute_s for r in plan.ranks]
    assert max(compute) / (sum(compute) / len(compute)) <= 1.05
    assert plan.split == tuple(choose_split(cfg, plan.layout.num_stages, plan.layout.pp))
    even = split_layers(cfg.model.num_layers, plan.layout.num_stages)
    assert sum(len(r) for r in plan.split) == 61 and list(plan.split) != even

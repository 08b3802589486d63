"""The PP x EP x DP layout: coordinates, groups, stages, batch slices, errors, the report and the command."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from collections import Counter
from pathlib import Path

import pytest

from k2train.config import ConfigError, load_config, micro_batches_per_step, resolve_dp
from k2train.config.schema import ParallelConfig
from parallel.layout import GROUP_AXES, GROUP_KINDS, Axis, Layout, LayoutError, RankCoords, make_layout
from launch.layout_cli import add_layout_parser
from parallel.plan.layout_report import describe_layout, ranks_text, representative_ranks

K2_1T = Path(__file__).resolve().parents[1] / "configs" / "k2_1t.yaml"
ORDERS = list(itertools.permutations(Axis))
ORDER_IDS = [",".join(a.value for a in order) for order in ORDERS]


def small(order: tuple[Axis, ...], pp: int = 2, ep: int = 3, dp: int = 4, vp: int = 1,
          per_node: int = 8) -> Layout:
    """Distinct degrees, so a swapped stride or axis cannot go unnoticed."""
    return Layout(world_size=pp * ep * dp, pp=pp, vp=vp, ep=ep, dp=dp, order=order, gpus_per_node=per_node)


@functools.lru_cache(maxsize=None)
def k2_layout(nodes: int, rank_order: str = "ep,pp,dp") -> Layout:
    """k2_1t on `nodes` nodes, built the way the launcher builds it."""
    cfg = load_config(K2_1T, (f"parallel.rank_order={rank_order}",))
    world = nodes * cfg.parallel.gpus_per_node
    dp = resolve_dp(cfg.parallel, world, str(K2_1T))
    return make_layout(world, cfg.parallel, num_layers=cfg.model.num_layers,
                       num_experts=cfg.model.num_experts, micro_batches=micro_batches_per_step(cfg, dp))


def node_spans(layout: Layout, kind: str) -> Counter:
    """How many groups of `kind` span 1, 2, ... nodes."""
    return Counter(len({layout.node_of(r) for r in g}) for g in layout.groups(kind))


# ---- coordinates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS, ids=ORDER_IDS)
def test_coordinates_round_trip_for_every_rank(order):
    layout = small(order)
    seen = set()
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert layout.rank_of(c) == rank
        seen.add((c.pp, c.ep, c.dp))
    assert seen == set(itertools.product(range(2), range(3), range(4)))
    # The first axis of the order varies fastest: rank 1 is one step along it.
    assert layout.coords(1).on(order[0]) == 1
    assert layout.strides == {order[0]: 1, order[1]: layout.degree(order[0]),
                              order[2]: layout.degree(order[0]) * layout.degree(order[1])}


def test_coordinates_follow_the_strides_of_the_order():
    # pp 2, ep 3, dp 4; rank 7 = ep 1 + pp 0 * 3 + dp 1 * 6 with EP fastest ...
    assert small((Axis.EP, Axis.PP, Axis.DP)).coords(7) == RankCoords(pp=0, ep=1, dp=1)
    # ... and pp 1 + ep 0 * 2 + dp 1 * 6 with PP fastest.
    assert small((Axis.PP, Axis.EP, Axis.DP)).coords(7) == RankCoords(pp=1, ep=0, dp=1)
    assert small((Axis.DP, Axis.EP, Axis.PP)).rank_of(RankCoords(pp=1, ep=2, dp=3)) == 3 + 2 * 4 + 1 * 12


def test_node_of_counts_ranks_node_by_node():
    layout = k2_layout(32)
    assert [layout.node_of(r) for r in (0, 7, 8, 15, 16, 255)] == [0, 0, 1, 1, 2, 31]


# ---- groups --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_groups_partition_the_world_and_share_the_other_coordinates(order, kind):
    layout = small(order)
    size = {"pipeline": 2, "expert": 3, "dense": 3 * 4, "expert_grad": 4}[kind]
    groups = layout.groups(kind)
    assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
    assert all(len(g) == size for g in groups)
    assert groups == sorted(groups, key=min) == layout.groups(kind)
    varying = GROUP_AXES[kind]
    for group in groups:
        coords = [layout.coords(r) for r in group]
        for axis in set(Axis) - set(varying):
            assert len({c.on(axis) for c in coords}) == 1, (kind, axis)
        # Members are ordered by the varying coordinates, the first listed slowest.
        assert [tuple(c.on(a) for a in varying) for c in coords] == list(
            itertools.product(*(range(layout.degree(a)) for a in varying)))
        for rank in group:
            assert getattr(layout, f"{kind}_group")(rank) == group


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_groups_match_megatron_rank_generator(kind):
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    for order in ORDERS:
        layout = small(order)
        mask = [axis in GROUP_AXES[kind] for axis in order]
        theirs = parallel_state.generate_masked_orthogonal_rank_groups(
            layout.world_size, [layout.degree(a) for a in order], mask)
        ours = layout.groups(kind)
        assert {frozenset(g) for g in ours} == {frozenset(g) for g in theirs}, order
        if len(GROUP_AXES[kind]) == 1:
            assert sorted(ours) == sorted(tuple(g) for g in theirs), order


def test_dense_group_is_ordered_by_sequence_rank():
    layout = small((Axis.DP, Axis.PP, Axis.EP))
    for rank in range(layout.world_size):
        group = layout.dense_group(rank)
        assert [layout.sequence_rank(r) for r in group] == list(range(layout.sequence_ranks))


def test_unknown_group_kind_is_refused():
    with pytest.raises(ValueError, match="pipeline, expert, dense, expert_grad"):
        small((Axis.EP, Axis.PP, Axis.DP)).groups("tensor")


# ---- k2_1t ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "dp"), [(32, 1), (64, 2), (128, 4)])
def test_k2_1t_runs_on_multiples_of_32_nodes_with_ep_groups_on_two_nodes(nodes, dp):
    layout = k2_layout(nodes)
    assert (layout.world_size, layout.pp, layout.vp, layout.ep, layout.dp) == (nodes * 8, 16, 2, 16, dp)
    assert (layout.model_parallel_size, layout.num_stages, layout.sequence_ranks) == (256, 32, 16 * dp)
    assert node_spans(layout, "expert") == {2: 16 * dp}
    assert all(len(layout.expert_group(r)) == 16 for r in (0, layout.world_size - 1))
    report = describe_layout(layout)
    assert f"expert (EP token all-to-all): {16 * dp} groups of 16 ranks" in report
    assert f"within one node: 0 of {16 * dp} groups; across 2 nodes: {16 * dp}" in report
    assert "each rank has 7 of its 15 EP peers on its own node" in report
    assert f"nodes: {nodes} of 8 GPUs (the world is a whole number of nodes)" in report


def test_k2_1t_with_pipeline_fastest_spreads_ep_groups_over_16_nodes():
    ep_first, pp_first = k2_layout(32), k2_layout(32, "pp,ep,dp")
    assert set(pp_first.groups("expert")).isdisjoint(ep_first.groups("expert"))
    assert node_spans(pp_first, "expert") == {16: 16}
    assert node_spans(pp_first, "pipeline") == {2: 16}
    assert node_spans(ep_first, "pipeline") == {16: 16}
    report = describe_layout(pp_first)
    assert "within one node: 0 of 16 groups; across 16 nodes: 16" in report
    assert "each rank has 0 of its 15 EP peers on its own node" in report
    # PP fastest: 16 pipeline ranks on 2 nodes, so only the 7 -> 8 and the 15 -> 0 links cross.
    assert "p2p links crossing nodes: 2 of 16 per group" in report
    assert "p2p links crossing nodes: 16 of 16 per group" in describe_layout(ep_first)


# ---- stages and batch slices ---------------------------------------------------------------------


def test_stage_indices_loop_over_pipeline_ranks():
    layout = small((Axis.EP, Axis.PP, Axis.DP), pp=4, ep=1, dp=1, vp=3)
    assert layout.num_stages == 12
    assert layout.stage_indices(1) == [1, 5, 9]
    assert sorted(s for p in range(4) for s in layout.stage_indices(p)) == list(range(12))
    with pytest.raises(LayoutError, match="pipeline rank 4 is outside 0..3"):
        layout.stage_indices(4)


@pytest.mark.parametrize("order", ORDERS, ids=ORDER_IDS)
def test_sequence_ranks_cover_each_batch_slice_once_per_stage(order):
    layout = small(order)
    for pp in range(layout.pp):
        ranks = [r for r in range(layout.world_size) if layout.coords(r).pp == pp]
        assert sorted(layout.sequence_rank(r) for r in ranks) == list(range(layout.sequence_ranks))
    for group in layout.groups("pipeline"):
        assert len({layout.sequence_rank(r) for r in group}) == 1


# ---- errors --------------------------------------------------------------------------------------


def build(world: int, layers: int = 8, experts: int = 16, micro: int | None = 8, **parallel) -> Layout:
    cfg = ParallelConfig(**{"pp": 4, "ep": 4, "dp": None, **parallel})
    return make_layout(world, cfg, num_layers=layers, num_experts=experts, micro_batches=micro)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"world": 100}, "a world of 100 ranks is not a multiple of parallel.pp 4 x parallel.ep 4 = 16 ranks"),
    ({"world": 32, "dp": 4}, "parallel.dp 4 = 64 ranks, but the world has 32; set parallel.dp to 2 or null"),
    ({"world": 32, "experts": 10}, "model.num_experts (10) must split evenly over parallel.ep (4)"),
    ({"world": 32, "vp": 2, "layers": 6},
     "model.num_layers (6) cannot fill parallel.pp 4 x parallel.vp 2 = 8 virtual pipeline stages"),
    ({"world": 32, "micro": 6},
     "train.global_batch_tokens gives 6 micro-batches per step on each sequence rank, but the "
     "interleaved schedule over parallel.pp=4 needs a multiple of 4."),
    ({"world": 32, "micro": 2}, "gives 2 micro-batches per step on each sequence rank, but the interleaved "
     "schedule over parallel.pp=4 needs at least 4 and a multiple of 4."),
    ({"world": 32, "micro": 0}, "gives 0 micro-batches per step on each sequence rank, but the interleaved "
     "schedule over parallel.pp=4 needs at least 4 and a multiple of 4."),
    ({"world": 32, "rank_order": "ep,ep,dp"}, "parallel.rank_order must name each of ep, pp, dp once"),
    ({"world": 32, "rank_order": "ep,pp,tp"}, "got 'ep,pp,tp'"),
    ({"world": 32, "gpus_per_node": 0}, "parallel.gpus_per_node must be at least 1, got 0."),
])
def test_layouts_that_cannot_run_are_refused_with_their_numbers(kwargs, expected):
    with pytest.raises(LayoutError) as info:
        build(**kwargs)
    assert expected in str(info.value)


def test_layouts_at_the_limits_are_accepted():
    assert build(32, micro=4).dp == 2
    assert build(32, micro=None).dp == 2  # the schedule rule waits for the batch
    assert build(32, layers=4, vp=1).num_stages == 4
    assert build(16, micro=3, pp=1, ep=4, dp=4).pp == 1  # no pipeline, no schedule rule


def test_a_layout_constructed_directly_checks_its_numbers():
    with pytest.raises(LayoutError, match="pp 2 x ep 3 x dp 4 = 24 ranks, but the world has 25"):
        Layout(world_size=25, pp=2, vp=1, ep=3, dp=4, order=(Axis.EP, Axis.PP, Axis.DP), gpus_per_node=8)
    with pytest.raises(LayoutError, match="must list each Axis"):
        Layout(world_size=24, pp=2, vp=1, ep=3, dp=4, order=("ep", "pp", "dp"), gpus_per_node=8)
    layout = small((Axis.EP, Axis.PP, Axis.DP))
    with pytest.raises(LayoutError, match="rank 24 is outside the world of 24 ranks"):
        layout.coords(24)
    with pytest.raises(LayoutError, match="ep coordinate 3 is outside 0..2"):
        layout.rank_of(RankCoords(pp=0, ep=3, dp=0))


# ---- report and command --------------------------------------------------------------------------


def test_report_names_partial_nodes_and_the_chosen_ranks():
    layout = small((Axis.EP, Axis.PP, Axis.DP))
    # Rank 0, the last stage (pp 1), the last EP rank of the last copy (ep 2, dp 3), the last rank.
    assert representative_ranks(layout) == [0, 3, 20, 23]
    assert "nodes: 3 of 8 GPUs (the world is a whole number of nodes)" in describe_layout(layout)
    uneven = dataclasses.replace(layout, gpus_per_node=10)
    report = describe_layout(uneven, ranks=[7])
    assert "not a whole number of nodes: 24 = 2 x 10 + 4" in report
    assert "rank 7: pp 0, ep 1, dp 1 on node 0; virtual stages [0]; batch slice 4 of 12" in report
    assert "rank 0:" not in report


def test_ranks_text_is_compact():
    assert ranks_text([3]) == "3"
    assert ranks_text(list(range(16))) == "0-15"
    assert ranks_text(list(range(0, 256, 16))) == "0, 16, ..., 240 (step 16)"
    assert ranks_text([0, 1, 6, 7]) == "0-1, 6-7"
    assert ranks_text([0, 1, 5, 9, 10, 20]) == "0-1, 5, 9-10, 20"
    assert ranks_text([0, 2, 5, 9, 14, 20]) == "0, 2, 5, ..., 20 (6 in all)"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2train")
    add_layout_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_layout_command_prints_the_k2_1t_report(capsys):
    assert run_cli(["layout", "--config", str(K2_1T), "--nodes", "32", "--ranks", "0,17,255"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Layout: 256 ranks = pp 16 x ep 16 x dp 1")
    assert "rank order (fastest first): ep, pp, dp; strides ep 1, pp 16, dp 256" in out
    assert "rank 17: pp 1, ep 1, dp 0 on node 2; virtual stages [1, 17]; batch slice 1 of 16" in out
    assert "expert       ranks 16-31 on 2 nodes: 2-3" in out
    assert "within one node: 0 of 16 groups; across 2 nodes: 16" in out


def test_layout_command_reports_errors_for_people(capsys):
    # 524288 tokens = 8 micro-batches of 4096 tokens on each of 16 sequence ranks: fewer than pp 16.
    argv = ["layout", "--config", str(K2_1T), "--nodes", "32", "--set", "train.global_batch_tokens=524288"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"k2train: error: {K2_1T} --set train.global_batch_tokens=524288 with --nodes 32")
    assert "gives 8 micro-batches per step" in err and "parallel.pp=16 needs at least 16" in err
    with pytest.raises(ConfigError, match="a world of 100 ranks is not a multiple"):
        run_cli(["layout", "--config", str(K2_1T), "--world-size", "100"])
    with pytest.raises(SystemExit):
        run_cli(["layout", "--config", str(K2_1T), "--nodes", "32", "--world-size", "256"])

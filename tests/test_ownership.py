"""ZeRO-1 MuonClip ownership: optimizer items (AdamW row blocks included), Newton–Schulz FLOPs, the
greedy owner assignment and the k2_1t optimizer plan (parallel/zero1/ownership.py, parallel/plan/optimizer.py)."""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import parallel.plan.optimizer as optimizer_plan
from launch.optimizer_plan_cli import add_optimizer_plan_parser
from k2train.config.checks import ConfigError
from k2train.config.schema import ModelConfig
from k2train.model import K2Model, ModelPart
from k2train.optim.muon_clip import split_param_groups
from k2train.optim.newton_schulz import newton_schulz
from parallel.zero1.ownership import (
    ADAMW_BLOCK_ELEMENTS,
    OptItem,
    assign_owners,
    item_cost,
    item_places,
    items_of,
    newton_schulz_flops,
    owner_loads,
    row_block_key,
    row_blocks,
)

K2_1T = Path(__file__).parents[1] / "configs" / "k2_1t.yaml"
GIB = 1024**3


def _base(key: str) -> str:
    return key.split("[")[0]


def _element_loads(items, owners, group_size: int) -> list[int]:
    loads = [0] * group_size
    for item, rank in zip(items, owners):
        loads[rank] += item.numel
    return loads


def _expanded_names(named) -> list[str]:
    """Parameter names with each 3-D expert stack repeated once per expert, in order."""
    return [name for name, p in named for _ in range(p.shape[0] if ".mlp.experts." in name else 1)]


# ---- items ----------------------------------------------------------------------------------------


def test_items_of_tiny_model_split_like_muon_clip():
    model = K2Model(ModelConfig())
    named = list(model.named_parameters())
    items = items_of(named, first_expert=0)
    muon_named, adamw_named = split_param_groups(named)
    assert [i.key for i in items if not i.muon] == [n for n, _ in adamw_named]
    assert list(dict.fromkeys(_base(i.key) for i in items if i.muon)) == [n for n, _ in muon_named]
    assert [_base(i.key) for i in items] == _expanded_names(named)
    assert sum(i.numel for i in items) == sum(p.numel() for _, p in named)
    cfg = model.cfg
    stacks = [n for n, p in named if p.ndim == 3]
    assert len(stacks) == 3 * cfg.num_moe_layers
    assert len(items) == len(named) + len(stacks) * (cfg.num_experts - 1)
    gate = [i for i in items if _base(i.key) == "layers.1.mlp.experts.gate_proj"]
    assert [i.key for i in gate] == [f"layers.1.mlp.experts.gate_proj[{e}]" for e in range(cfg.num_experts)]
    assert all(i.shape == (cfg.moe_intermediate_size, cfg.hidden_size) and i.muon for i in gate)
    assert {i.key: i.muon for i in items}["layers.1.mlp.gate.weight"]  # the router is a hidden matrix


def test_items_of_meta_expert_slice_uses_global_expert_indices():
    cfg = ModelConfig()
    with torch.device("meta"):
        part = K2Model(cfg, ModelPart(range(1, 3), embedding=False, head=True, first_expert=4, num_local_experts=4))
    named = list(part.named_parameters())
    items = items_of(named, first_expert=4)
    down = [i for i in items if _base(i.key) == "layers.2.mlp.experts.down_proj"]
    assert [i.key for i in down] == [f"layers.2.mlp.experts.down_proj[{e}]" for e in range(4, 8)]
    assert all(i.shape == (cfg.hidden_size, cfg.moe_intermediate_size) for i in down)
    expert_items = [i for i in items if ".mlp.experts." in i.key]
    assert len(expert_items) == 2 * 3 * 4 and len({i.key for i in items}) == len(items)
    muon_named, adamw_named = split_param_groups(named)
    assert sorted({_base(i.key) for i in items if i.muon}) == sorted(n for n, _ in muon_named)
    assert [i.key for i in items if not i.muon] == [n for n, _ in adamw_named]
    # Bare shapes give the same items; a frozen tensor is dropped, as split_param_groups drops it.
    assert items_of([(n, tuple(p.shape)) for n, p in named], 4) == items
    frozen = torch.empty(3, 4, device="meta")
    assert items_of([("x.weight", frozen), ("y.weight", (3, 4))], 0) == [OptItem("y.weight", (3, 4), True)]


def test_row_blocks_by_hand():
    assert row_blocks((10, 4), 40) is None  # not above the threshold: whole
    assert row_blocks((10, 4), 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # 12 // 4 = 3 rows a block
    assert row_blocks((10, 4), 13) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks((10, 4), 3) == [(i, i + 1) for i in range(10)]  # a row above the threshold: one row a block
    assert row_blocks((1, 400), 10) is None  # one row cannot be cut by rows
    assert row_blocks((100,), 30) == [(0, 30), (30, 60), (60, 90), (90, 100)]  # a vector by elements
    assert row_blocks((), 1) is None
    assert row_block_key("lm_head.weight", 0, 2340) == "lm_head.weight[rows 0:2340]"
    # K2's embedding: 163840 x 7168 in blocks of 2**24 // 7168 = 2340 rows, the last one 40.
    k2 = row_blocks((163840, 7168), ADAMW_BLOCK_ELEMENTS)
    assert ADAMW_BLOCK_ELEMENTS == 2**24 and len(k2) == 71 and k2[-1] == (163800, 163840)
    with pytest.raises(ValueError, match="adamw_block_elements must be at least 1, got 0"):
        row_blocks((10, 4), 0)


def _tiny_part(first_expert: int, embedding: bool, head: bool, layers: range):
    with torch.device("meta"):
        return K2Model(ModelConfig(), ModelPart(layers, embedding=embedding, head=head, first_expert=first_expert,
                                                num_local_experts=4))


def test_large_adamw_parameters_become_row_blocks_that_cover_them_once():
    cfg = ModelConfig()  # embedding and head 512 x 64 = 32768 elements; norms 64
    model = K2Model(cfg)
    named = list(model.named_parameters())
    assert items_of(named, 0) == items_of(named, 0, 2**15)  # the default keeps the tiny model whole
    places = item_places(named, 0, 5000)  # 5000 // 64 = 78 rows a block
    blocks = [p for p in places if p.item.rows is not None]
    assert {_base(p.item.key) for p in blocks} == {"embed_tokens.weight", "lm_head.weight"}
    params = dict(named)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        mine = [p for p in blocks if _base(p.item.key) == name]
        assert [p.item.rows for p in mine] == [(a, min(a + 78, 512)) for a in range(0, 512, 78)]
        assert [p.item.key for p in mine] == [f"{name}[rows {a}:{b}]" for a, b in (p.item.rows for p in mine)]
        covered = torch.zeros(512, dtype=torch.int64)
        for p in mine:
            part = named[p.position][1][p.part]  # the block is a view of its rows
            assert not p.item.muon and tuple(part.shape) == p.item.shape and p.item.shape[1:] == (cfg.hidden_size,)
            assert part.data_ptr() == params[name][p.item.rows[0]].data_ptr()
            covered[p.part] += 1
        assert covered.eq(1).all()  # every row in exactly one block
    # Everything else is as without blocks, in the same order; the elements add up.
    cut = ("embed_tokens.weight", "lm_head.weight")
    assert [p.item for p in places if p.item.rows is None] == [i for i in items_of(named, 0) if i.key not in cut]
    assert sum(p.item.numel for p in places) == sum(p.numel() for _, p in named)
    assert [_base(p.item.key) for p in places if p.item.rows is None or p.item.rows[0] == 0] == _expanded_names(named)


def test_row_block_keys_do_not_depend_on_the_layout():
    """The same parameter in another part (pipeline stage, EP slice) is cut into the same keyed blocks."""
    whole = {i.key: i for i in items_of(K2Model(ModelConfig()).named_parameters(), 0, 5000)}
    first = items_of(_tiny_part(4, True, False, range(0, 1)).named_parameters(), 4, 5000)
    last = items_of(_tiny_part(0, False, True, range(1, 3)).named_parameters(), 0, 5000)
    for item in first + last:
        assert whole[item.key] == item, item.key
    assert sum(i.rows is not None for i in first) == sum(i.rows is not None for i in last) == 7


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_row_blocks_spread_the_embedding_and_head_over_the_owners(group_size):
    named = list(K2Model(ModelConfig()).named_parameters())
    whole, blocked = items_of(named, 0), items_of(named, 0, 2048)
    regions = {}
    for label, items in (("whole", whole), ("blocked", blocked)):
        owners = assign_owners(items, group_size)
        regions[label] = max(_element_loads(items, owners, group_size))
        owned = {rank for item, rank in zip(items, owners) if item.rows is not None}
        if label == "blocked":
            assert owned == set(range(group_size))  # every rank owns some rows
            # Within one block of even (above the Muon pass's most, which does not reach it here).
            assert regions[label] <= sum(i.numel for i in items) / group_size + 2048
    assert regions["blocked"] < regions["whole"]


# ---- Newton–Schulz FLOPs ----------------------------------------------------------------------------


def test_newton_schulz_flops_by_hand_and_by_torch_counter():
    # [3, 5], a=3, b=5: X·Xᵀ 2·3·3·5 = 90, A·A 2·27 = 54, B·X 90 -> 234 per step, 1170 for 5.
    assert newton_schulz_flops(3, 5) == 1170 == newton_schulz_flops(5, 3)
    assert newton_schulz_flops(3, 5, steps=1) == 234
    for n, m in [(3, 5), (7, 4), (6, 6)]:
        with FlopCounterMode(display=False) as counter:
            newton_schulz(torch.randn(n, m), steps=5, dtype=torch.float32)
        assert counter.get_total_flops() == newton_schulz_flops(n, m, 5)
    assert item_cost(OptItem("w", (3, 5), True)) == 1170
    assert item_cost(OptItem("norm", (64,), False)) == 64
    assert item_cost(OptItem("embed", (512, 64), False)) == 512 * 64


# ---- assignment -----------------------------------------------------------------------------------


def _random_items(seed: int, count: int) -> list[OptItem]:
    rng = random.Random(seed)
    items = []
    for i in range(count):
        if rng.random() < 0.7:
            items.append(OptItem(f"m{i}", (rng.choice([8, 16, 24, 64]), rng.choice([8, 32, 48])), True))
        else:
            items.append(OptItem(f"a{i}", (rng.choice([1, 16, 100, 1000]),), False))
    return items


def test_assign_owners_by_hand():
    # AdamW costs 3, 10, 5, 7, 5 over 2 ranks, taken largest first (equal 5s in item order):
    # 10->0, 7->1, the first 5->1 (7<10), the second 5->0 (10<12), 3->1 (12<15).
    adamw = [OptItem(f"a{i}", (n,), False) for i, n in enumerate([3, 10, 5, 7, 5])]
    assert assign_owners(adamw, 2) == [1, 0, 1, 1, 0]
    # Equal costs on equal loads: the earlier item goes to the lower rank.
    assert assign_owners([OptItem("x", (4,), False), OptItem("y", (4,), False)], 2) == [0, 1]
    # Muon by FLOPs (w -> 0, v -> 1), then AdamW by elements from the Muon pass's elements (64, 16):
    # e goes to rank 1, which owns fewer; then f (40) to rank 0 (64 < 116), g (30) to rank 0 (104 < 116).
    mixed = [OptItem("w", (8, 8), True), OptItem("v", (4, 4), True), OptItem("e", (100,), False),
             OptItem("f", (40,), False), OptItem("g", (30,), False)]
    assert assign_owners(mixed, 2) == [0, 1, 1, 0, 0]
    assert assign_owners(mixed, 1) == [0] * 5
    with pytest.raises(ValueError, match="group_size 0"):
        assign_owners(mixed, 0)


@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 8])
def test_assign_owners_is_deterministic_and_largest_first_bounded(group_size):
    items = _random_items(seed=group_size, count=60)
    owners = assign_owners(items, group_size)
    assert owners == assign_owners(list(items), group_size) == assign_owners(tuple(items), group_size)
    assert len(owners) == len(items) and all(0 <= r < group_size for r in owners)
    if group_size == 1:
        assert set(owners) == {0}
    flops = [0] * group_size
    for item, rank in zip(items, owners):
        flops[rank] += item_cost(item) if item.muon else 0
    costs = [item_cost(i) for i in items if i.muon]
    assert sum(flops) == sum(costs)  # every Muon item owned exactly once
    assert max(flops) <= sum(costs) / group_size + max(costs)
    # AdamW fills up the owners' elements from where the Muon pass left them.
    muon_elements = _element_loads([i for i in items if i.muon], [r for i, r in zip(items, owners) if i.muon],
                                   group_size)
    elements = _element_loads(items, owners, group_size)
    assert sum(elements) == sum(i.numel for i in items)
    largest_adamw = max(i.numel for i in items if not i.muon)
    assert max(elements) <= max(max(muon_elements), sum(elements) / group_size + largest_adamw)


def test_optimizer_bytes_of_the_tiny_model_fall_as_one_over_group_size():
    named = list(K2Model(ModelConfig()).named_parameters())
    items = items_of(named, 0)
    muon_named, adamw_named = split_param_groups(named)
    # FP32 master (4 B) + momentum (4 B) for Muon, master + two moments (8 B) for AdamW.
    unsharded = 8 * sum(p.numel() for _, p in muon_named) + 12 * sum(p.numel() for _, p in adamw_named)
    largest = max(i.state_bytes for i in items)
    for group_size in (1, 2, 3, 4):
        load = owner_loads(items, assign_owners(items, group_size), group_size)
        state = [load.optimizer_state_bytes(r) for r in range(group_size)]
        assert sum(state) == unsharded
        assert max(state) <= unsharded / group_size + largest
        assert load.imbalance() < 1.02  # many small matrices: NS FLOPs spread almost evenly
        assert load.bytes_imbalance() == pytest.approx(max(state) * group_size / unsharded)
    assert owner_loads(items, assign_owners(items, 1), 1).optimizer_state_bytes(0) == unsharded


# ---- the k2_1t plan ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2train")
    add_optimizer_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _check_k2_1t_plan(plan, nodes: int, out: str) -> None:
    lay = plan.layout
    assert f"{nodes * 8} ranks = pp 16 x ep 16 x dp {nodes // 32}" in out
    for dense in plan.dense.values():
        state = [dense.load.optimizer_state_bytes(r) for r in range(lay.sequence_ranks)]
        assert sum(state) == dense.total_bytes  # each dense item owned once in its stage's ep*dp group
        muon_flops = [item_cost(i) for i in dense.items if i.muon]
        assert max(dense.load.ns_flops) <= sum(muon_flops) / lay.sequence_ranks + max(muon_flops)  # largest first
        # Elements: AdamW row blocks (at most 2**24) even the owners out above the Muon pass's most.
        elements = [m + a for m, a in zip(dense.load.muon_numel, dense.load.adamw_numel)]
        assert max(elements) <= max(max(dense.load.muon_numel), sum(elements) / lay.sequence_ranks + 2**24)
    for expert in plan.expert.values():
        state = [expert.load.optimizer_state_bytes(r) for r in range(lay.dp)]
        assert state == [expert.total_bytes // lay.dp] * lay.dp  # equal-shape experts split exactly
    row = re.search(r"^\s+0\s+0\s+0\s+0\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    r0 = plan.rank_plan(0)
    assert float(row.group(3)) == pytest.approx(r0.owned_bytes / GIB, abs=0.006)
    assert float(row.group(4)) == pytest.approx(r0.unsharded_bytes / GIB, abs=0.006)


def test_k2_1t_plan_prints_and_owned_bytes_fall_as_dp_grows(capsys, monkeypatch):
    built = {}
    real_build = optimizer_plan.build_plan

    def recording_build(cfg, layout):
        built[layout.dp] = real_build(cfg, layout)
        return built[layout.dp]

    monkeypatch.setattr(optimizer_plan, "build_plan", recording_build)
    for nodes in (32, 64, 128):
        args = _parser().parse_args(["optimizer-plan", "--config", str(K2_1T), "--nodes", str(nodes),
                                     "--ranks", "0,15,240,255"])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        # The 1.17B-element embedding and head are AdamW row blocks now: the first dense FFN is largest.
        assert "largest item: layers.0.mlp.gate_proj.weight [18432, 7168]" in out
        _check_k2_1t_plan(built[nodes // 32], nodes, out)
    for rank in (0, 15, 240, 255):  # the same (pp, ep), dp 0, at dp 1, 2, 4
        plans = [built[dp].rank_plan(rank) for dp in (1, 2, 4)]
        assert [p.unsharded_bytes for p in plans] == [plans[0].unsharded_bytes] * 3
        assert [p.expert_bytes * dp for p, dp in zip(plans, (1, 2, 4))] == [plans[0].expert_bytes] * 3
        assert plans[0].owned_bytes > plans[1].owned_bytes > plans[2].owned_bytes
    for dp in (1, 2, 4):  # mean dense state per rank: the stage's dense state / (ep * dp)
        lay = built[dp].layout
        dense_owned = sum(built[dp].rank_plan(r).dense_bytes for r in lay.dense_group(0))
        assert dense_owned == built[dp].dense[0].total_bytes
    world_owned = {dp: sum(p.rank_plan(r).owned_bytes for r in range(p.layout.world_size)) for dp, p in built.items()}
    assert world_owned[1] == world_owned[2] == world_owned[4]  # one copy of the state, whatever dp


def test_plan_command_errors_name_the_world(capsys):
    args = _parser().parse_args(["optimizer-plan", "--config", str(K2_1T), "--nodes", "32", "--ranks", "0,256"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--nodes 32 (256 ranks)" in err and "rank 256 is outside" in err
    args = _parser().parse_args(["optimizer-plan", "--config", str(K2_1T), "--world-size", "100"])
    with pytest.raises(ConfigError, match="a world of 100 ranks is not a multiple"):
        args.func(args)


def test_registering_the_command_does_not_import_torch():
    # The command line registers every subcommand on start; `k2train --help` must stay quick.
    code = "import sys, launch.optimizer_plan_cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0

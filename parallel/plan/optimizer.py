"""The ZeRO-1 MuonClip plan of a layout: who owns which optimizer item, and what each rank then keeps.

Every rank's model parts are built on the meta device (nothing is allocated, as in param_report.py)
and cut into optimizer items (ownership.py). Each gradient-reduction group shares its items out
(DESIGN §3): the dense items of a pipeline rank over the ep*dp ranks of its stage ("dense" group),
the expert items of one EP slice over the dp ranks holding it ("expert_grad" group). The report
shows, per rank, the optimizer-state bytes it owns against what it would keep without sharding
(everything it holds), its Newton–Schulz FLOPs per step and its matrix count, and per group kind
how evenly the greedy assignment spreads FLOPs and bytes.

torch, the model and the ownership rules are imported inside the functions that use them, so the
command line can register `optimizer-plan` without importing torch (as `layout --params` does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from k2train.config.checks import resolve_dp
from k2train.config.schema import JobConfig
from parallel.layout import Layout, LayoutError, RankCoords, config_layout
from parallel.plan.layout_report import add_world_arguments, config_and_world, representative_ranks

if TYPE_CHECKING:
    from parallel.zero1.ownership import OptItem, OwnerLoad

_GIB = 1024**3


@dataclass(frozen=True)
class GroupAssignment:
    """One reduction group's items, their owners (group indices) and the resulting loads."""

    items: list[OptItem]
    owners: list[int]
    load: OwnerLoad
    matrices: list[int]  # per group rank: matrices it orthogonalises

    def owned(self, index: int) -> list[OptItem]:
        return [item for item, owner in zip(self.items, self.owners) if owner == index]

    @property
    def total_bytes(self) -> int:
        """Optimizer state of the whole group's items: what each member keeps without sharding."""
        return sum(item.state_bytes for item in self.items)


@dataclass(frozen=True)
class RankPlan:
    """What one rank owns under ZeRO-1 and what it would keep without sharding."""

    rank: int
    coords: RankCoords
    dense_bytes: int  # optimizer state of its owned dense items
    expert_bytes: int  # optimizer state of its owned expert items
    unsharded_bytes: int  # optimizer state of every item it holds
    ns_flops: int  # Newton–Schulz FLOPs per optimizer step
    matrices: int  # matrices it orthogonalises per step

    @property
    def owned_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes


@dataclass(frozen=True)
class OptimizerPlan:
    """Assignments of every dense group (by pipeline rank) and expert group (by (pp, ep))."""

    layout: Layout
    dense: dict[int, GroupAssignment]
    expert: dict[tuple[int, int], GroupAssignment]

    def rank_plan(self, rank: int) -> RankPlan:
        """The owned share of `rank`: its index in its dense group and in its expert_grad group."""
        c = self.layout.coords(rank)
        dense, expert = self.dense[c.pp], self.expert[(c.pp, c.ep)]
        d = self.layout.dense_group(rank).index(rank)
        e = self.layout.expert_grad_group(rank).index(rank)
        return RankPlan(
            rank, c,
            dense_bytes=dense.load.optimizer_state_bytes(d),
            expert_bytes=expert.load.optimizer_state_bytes(e),
            unsharded_bytes=dense.total_bytes + expert.total_bytes,
            ns_flops=dense.load.ns_flops[d] + expert.load.ns_flops[e],
            matrices=dense.matrices[d] + expert.matrices[e],
        )


def build_plan(cfg: JobConfig, layout: Layout) -> OptimizerPlan:
    """Build each (pipeline rank, EP rank) part once on meta (dp replicas share it) and assign owners."""
    from parallel.pipeline.split import choose_split

    ns_steps = cfg.optimizer.ns_steps
    split = choose_split(cfg, layout.num_stages, layout.pp)
    dense, expert = {}, {}
    for pp in range(layout.pp):
        for ep in range(layout.ep):
            dense_items, expert_items = _part_items(cfg, layout, split, pp, ep)
            # Dense weights are the same on every EP rank of a stage: one group per pipeline rank.
            if ep == 0:
                dense[pp] = _assign(dense_items, layout.sequence_ranks, ns_steps)
            expert[(pp, ep)] = _assign(expert_items, layout.dp, ns_steps)
    return OptimizerPlan(layout, dense, expert)


def _part_items(cfg: JobConfig, layout: Layout, split: list[range], pp: int, ep: int) -> tuple[list, list]:
    """(dense items, expert items) of the virtual stages of pipeline rank `pp` on EP rank `ep`."""
    import torch

    from parallel.zero1.ownership import is_expert_param
    from parallel.zero1.ownership import items_of
    from parallel.pipeline.stages import build_stage_models

    with torch.device("meta"):
        parts = build_stage_models(cfg.model, split, layout.stage_indices(pp), ep, layout.ep, cfg.train.seed)
    dense, expert = [], []
    blocks = cfg.optimizer.adamw_block_elements
    for part in parts:
        named = list(part.named_parameters())
        dense += items_of([(n, p) for n, p in named if not is_expert_param(n)], part.part.first_expert, blocks)
        expert += items_of([(n, p) for n, p in named if is_expert_param(n)], part.part.first_expert, blocks)
    return dense, expert


def _assign(items: list[OptItem], group_size: int, ns_steps: int) -> GroupAssignment:
    from parallel.zero1.ownership import assign_owners, owner_loads

    owners = assign_owners(items, group_size, ns_steps)
    matrices = [0] * group_size
    for item, owner in zip(items, owners):
        matrices[owner] += item.matrices
    return GroupAssignment(items, owners, owner_loads(items, owners, group_size, ns_steps), matrices)


# ---- the report -------------------------------------------------------------------------------


def describe_plan(plan: OptimizerPlan, ranks: Sequence[int]) -> str:
    """The chosen ranks' owned optimizer state against the unsharded one, then the balance per group kind."""
    lay = plan.layout
    lines = [
        f"ZeRO-1 MuonClip plan: {lay.world_size} ranks = pp {lay.pp} x ep {lay.ep} x dp {lay.dp}",
        f"  dense items of a pipeline rank are owned over its ep*dp = {lay.sequence_ranks} ranks (dense group);"
        f" expert items of an EP slice over its dp = {lay.dp} (expert_grad group)",
        "  state per owned element: FP32 master 4 B + Muon momentum 4 B, or + AdamW moments 8 B",
        "",
        "Optimizer state per rank (GiB): owned under ZeRO-1, and kept without sharding (all it holds):",
        f"  {'rank':>6} {'pp':>3} {'ep':>3} {'dp':>3} {'dense':>8} {'experts':>8} {'owned':>8} "
        f"{'unsharded':>10} {'ratio':>7} {'NS TFLOP/step':>14} {'matrices':>9}",
    ]
    for rank in ranks:
        r = plan.rank_plan(rank)
        lines.append(
            f"  {rank:>6} {r.coords.pp:>3} {r.coords.ep:>3} {r.coords.dp:>3} {r.dense_bytes / _GIB:>8.2f} "
            f"{r.expert_bytes / _GIB:>8.2f} {r.owned_bytes / _GIB:>8.2f} {r.unsharded_bytes / _GIB:>10.2f} "
            f"{r.owned_bytes / r.unsharded_bytes:>7.3f} {r.ns_flops / 1e12:>14.2f} {r.matrices:>9,}")
    lines += ["", "Balance of the assignment, max/mean over the ranks of each group (1.00 is even):"]
    lines += _balance_lines("dense", {f"pp {k}": g for k, g in plan.dense.items()})
    lines += _balance_lines("expert_grad", {f"pp {k[0]} ep {k[1]}": g for k, g in plan.expert.items()})
    lines += _world_lines(plan)
    return "\n".join(lines)


def _balance_lines(kind: str, groups: dict[str, GroupAssignment]) -> list[str]:
    """Worst and mean max/mean of NS FLOPs and of bytes over the groups of one kind, and the largest item."""
    size = next(iter(groups.values())).load.group_size
    flops = {name: g.load.imbalance() for name, g in groups.items()}
    state = {name: g.load.bytes_imbalance() for name, g in groups.items()}
    items = [item for g in groups.values() for item in g.items]
    largest = max(items, key=lambda item: item.state_bytes)
    lines = [f"  {kind} ({len(groups)} groups of {size} rank{'s' if size > 1 else ''}):"]
    for label, values in (("NS FLOPs", flops), ("state bytes", state)):
        worst = max(values, key=values.get)
        lines.append(f"    {label:<12} worst {values[worst]:.2f} ({worst}), mean over groups "
                     f"{sum(values.values()) / len(values):.2f}")
    lines.append(f"    largest item: {largest.key} {list(largest.shape)}, {largest.state_bytes / _GIB:.2f} GiB "
                 f"of state on its one owner")
    return lines


def _world_lines(plan: OptimizerPlan) -> list[str]:
    """Balance over all ranks (what sets the step time and the largest memory), and the world totals.

    Each item is owned once, so the owned state of all ranks adds up to one copy of the model's.
    """
    lay = plan.layout
    totals = [plan.rank_plan(rank) for rank in range(lay.world_size)]
    lines = ["  all ranks (dense and expert share together):"]
    for label, values in (("NS FLOPs", [r.ns_flops for r in totals]), ("state bytes", [r.owned_bytes for r in totals])):
        worst = max(range(lay.world_size), key=values.__getitem__)
        lines.append(f"    {label:<12} max/mean {max(values) * len(values) / sum(values):.2f} (rank {worst})")
    dense = sum(g.total_bytes for g in plan.dense.values())
    expert = sum(g.total_bytes for g in plan.expert.values())
    owned, unsharded = dense + expert, dense * lay.sequence_ranks + expert * lay.dp
    lines += [
        "",
        f"All {lay.world_size} ranks: owned {owned / _GIB:,.1f} GiB = one copy of the model's optimizer state; "
        f"without sharding {unsharded / _GIB:,.1f} GiB ({unsharded / owned:.1f}x: dense state on every "
        f"ep*dp rank, expert state on every dp rank)",
    ]
    return lines


# ---- the `optimizer-plan` command -------------------------------------------------------------


def add_optimizer_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `optimizer-plan --config FILE [--set K=V] (--nodes N | --world-size N) [--ranks R,R]`."""
    plan = subparsers.add_parser(
        "optimizer-plan",
        help="print the ZeRO-1 MuonClip ownership of a config's optimizer state on a given number of nodes")
    add_world_arguments(plan)
    plan.set_defaults(func=run_optimizer_plan)
    return plan


def run_optimizer_plan(args: argparse.Namespace) -> int:
    """Load the config, lay it out on the requested world, assign owners and print the plan."""
    cfg, world, source = config_and_world(args)
    dp = resolve_dp(cfg.parallel, world, source)  # a world the layout cannot fill stops here, naming the source
    try:
        layout = config_layout(cfg, world, dp)
        ranks = representative_ranks(layout) if args.ranks is None else args.ranks
        for rank in ranks:
            layout.coords(rank)  # a rank outside the world stops here, before the parts are built
        report = describe_plan(build_plan(cfg, layout), ranks)
    except LayoutError as err:
        # Same form as the main CLI's errors for people: one sentence, no traceback.
        print(f"k2train: error: {source}: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0

"""A readable report of a `Layout`, and the `k2train layout` command that prints one for a config.

The report answers the questions asked before a large job is launched: how many nodes and model
copies, where a given rank sits and whom it talks to, and above all whether the EP all-to-all stays
inside nodes (NVLink) or crosses them (RoCE), and how many pipeline p2p sends cross node boundaries
(K2 report §2.4: EP 16 over 8-GPU nodes, its all-to-all hidden under interleaved 1F1B).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from k2train.config.checks import validate_world
from k2train.config.load import load_config
from k2train.config.schema import JobConfig
from parallel.layout import GROUP_AXES, GROUP_KINDS, Axis, Layout, LayoutError, RankCoords, config_layout
from parallel.pipeline.split import SplitError, choose_split, describe_split

# Groups listed one by one up to this many; past it the report gives counts and the first few.
_LIST_ALL = 8
_LIST_FIRST = 4
_PURPOSE = {
    "expert": "EP token all-to-all",
    "pipeline": "pipeline p2p sends",
    "dense": "dense-weight gradient reduction",
    "expert_grad": "expert-weight gradient reduction",
}


def describe_layout(layout: Layout, ranks: Sequence[int] | None = None) -> str:
    """The report: degrees, order, nodes, copies; `ranks` (default: a few) in detail; node spans."""
    chosen = representative_ranks(layout) if ranks is None else list(ranks)
    lines = _summary(layout)
    lines += ["", "Ranks:"]
    for rank in chosen:
        lines += _rank_lines(layout, rank)
    lines += ["", f"Where the groups sit relative to nodes of {layout.gpus_per_node} GPUs:"]
    for kind in ("expert", "pipeline", "dense", "expert_grad"):
        lines += _placement_lines(layout, kind, detail=kind in ("expert", "pipeline"))
    return "\n".join(lines)


def representative_ranks(layout: Layout) -> list[int]:
    """Rank 0, the last pipeline stage of the first copy, the last EP rank of the last copy, the last rank."""
    last_stage = layout.rank_of(RankCoords(pp=layout.pp - 1, ep=0, dp=0))
    last_ep = layout.rank_of(RankCoords(pp=0, ep=layout.ep - 1, dp=layout.dp - 1))
    return sorted({0, last_stage, last_ep, layout.world_size - 1})


def _summary(layout: Layout) -> list[str]:
    strides = layout.strides
    order = ", ".join(a.value for a in layout.order)
    stride_text = ", ".join(f"{a.value} {strides[a]}" for a in layout.order)
    mp = layout.model_parallel_size
    return [
        f"Layout: {layout.world_size} ranks = pp {layout.pp} x ep {layout.ep} x dp {layout.dp} "
        f"(no tensor parallelism)",
        f"  virtual stages: vp {layout.vp} per pipeline rank, {layout.num_stages} in all "
        f"(stage s on pipeline rank s % {layout.pp})",
        f"  rank order (fastest first): {order}; strides {stride_text}",
        f"  nodes: {_nodes_text(layout.world_size, layout.gpus_per_node)}",
        f"  model copies: {layout.dp} (dp), each on pp {layout.pp} x ep {layout.ep} = {mp} ranks "
        f"= {mp / layout.gpus_per_node:g} nodes",
        f"  sequence ranks per stage: ep {layout.ep} x dp {layout.dp} = {layout.sequence_ranks}, "
        f"each reading its own slice of the global batch",
    ]


def _nodes_text(world: int, per_node: int) -> str:
    whole, rest = divmod(world, per_node)
    if rest == 0:
        return f"{whole} of {per_node} GPUs (the world is a whole number of nodes)"
    return (f"{whole + 1} of {per_node} GPUs, the last holding {rest} ranks "
            f"(the world is not a whole number of nodes: {world} = {whole} x {per_node} + {rest})")


def _rank_lines(layout: Layout, rank: int) -> list[str]:
    c = layout.coords(rank)
    lines = [
        f"  rank {rank}: pp {c.pp}, ep {c.ep}, dp {c.dp} on node {layout.node_of(rank)}; "
        f"virtual stages {layout.stage_indices(c.pp)}; "
        f"batch slice {layout.sequence_rank(rank)} of {layout.sequence_ranks}"]
    for kind in GROUP_KINDS:
        group = getattr(layout, f"{kind}_group")(rank)
        lines.append(f"    {kind:<12} {_members_text(layout, group)}")
    return lines


def _placement_lines(layout: Layout, kind: str, detail: bool) -> list[str]:
    groups = layout.groups(kind)
    spans = [sorted({layout.node_of(r) for r in g}) for g in groups]
    counts = Counter(len(s) for s in spans)
    span_text = f"within one node: {counts.pop(1, 0)} of {len(groups)} groups"
    span_text += "".join(f"; across {k} nodes: {n}" for k, n in sorted(counts.items()))
    lines = [f"  {kind} ({_PURPOSE[kind]}): {_plural(len(groups), 'group')} of "
             f"{_plural(len(groups[0]), 'rank')}", f"    {span_text}"]
    if kind == "expert" and layout.ep > 1:
        lines.append(f"    {_ep_peers_text(layout, groups)}")
    if kind == "pipeline" and layout.pp > 1:
        lines.append(f"    {_pipeline_hops_text(layout, groups)}")
    if not detail:
        return lines
    shown = groups if len(groups) <= _LIST_ALL else groups[:_LIST_FIRST]
    fixed = [a for a in Axis if a not in GROUP_AXES[kind]]
    for group in shown:
        c = layout.coords(group[0])
        label = ", ".join(f"{a.value} {c.on(a)}" for a in fixed)
        lines.append(f"    {label}: {_members_text(layout, group)}")
    if len(shown) < len(groups):
        lines.append(f"    ... and {len(groups) - len(shown)} more {kind} groups")
    return lines


def _ep_peers_text(layout: Layout, groups: list[tuple[int, ...]]) -> str:
    """How many of a rank's EP peers share its node: the all-to-all traffic that stays on NVLink."""
    local = set()
    for group in groups:
        per_node = Counter(layout.node_of(r) for r in group)
        local.update(n - 1 for n in per_node.values())
    peers = _plural(layout.ep - 1, "EP peer")
    if len(local) == 1:
        return f"each rank has {local.pop()} of its {peers} on its own node"
    return f"a rank has {min(local)} to {max(local)} of its {peers} on its own node"


def _pipeline_hops_text(layout: Layout, groups: list[tuple[int, ...]]) -> str:
    """Stage-to-stage sends that cross nodes; with vp > 1 the last pipeline rank also sends to the first."""
    hops = layout.pp if layout.vp > 1 else layout.pp - 1
    crossing = set()
    for group in groups:
        pairs = zip(group, group[1:] + group[:1])
        crossing.add(sum(layout.node_of(a) != layout.node_of(b) for a, b in list(pairs)[:hops]))
    across = f"{min(crossing)} to {max(crossing)}" if len(crossing) > 1 else f"{crossing.pop()}"
    wrap = f" (vp {layout.vp}: the last pipeline rank also sends to the first)" if layout.vp > 1 else ""
    return f"p2p links crossing nodes: {across} of {hops} per group{wrap}"


def _members_text(layout: Layout, group: Sequence[int]) -> str:
    """"ranks 0-15 on 2 nodes: 0-1", "ranks 0-7 on node 0" or "rank 3 on node 0"."""
    nodes = sorted({layout.node_of(r) for r in group})
    where = f"node {nodes[0]}" if len(nodes) == 1 else f"{len(nodes)} nodes: {ranks_text(nodes)}"
    who = f"rank {group[0]}" if len(group) == 1 else f"ranks {ranks_text(group)}"
    return f"{who} on {where}"


def ranks_text(ranks: Sequence[int]) -> str:
    """Compact ranks: "0-15", "0, 16, ..., 240 (step 16)", "0-15, 256-271" or a shortened list."""
    runs = _consecutive_runs(ranks)
    if len(runs) <= _LIST_FIRST:
        return ", ".join(_run_text(run) for run in runs)
    steps = {b - a for a, b in zip(ranks, ranks[1:])}
    if len(steps) == 1:
        return f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]} (step {steps.pop()})"
    head = ", ".join(_run_text(run) for run in runs[:3])
    return f"{head}, ..., {_run_text(runs[-1])} ({len(ranks)} in all)"


def _consecutive_runs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs


def _run_text(run: tuple[int, int]) -> str:
    return f"{run[0]}" if run[0] == run[1] else f"{run[0]}-{run[1]}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---- the `layout` command ---------------------------------------------------------------------


def add_layout_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `layout --config FILE [--set K=V] (--nodes N | --world-size N) [--ranks R,R]`."""
    layout = subparsers.add_parser(
        "layout", help="print the PP x EP x DP layout of a config on a given number of nodes or ranks")
    add_world_arguments(layout)
    layout.add_argument("--params", action="store_true",
                        help="also build the chosen ranks' model parts on the meta device and count their parameters")
    layout.set_defaults(func=run_layout)
    return layout


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE [--set K=V]... (--nodes N | --world-size N) [--ranks R,R]`, shared by the
    commands that describe a config on a world it is not running on."""
    parser.add_argument("--config", required=True, metavar="FILE", help="a YAML job config, e.g. configs/k2_1t.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set parallel.rank_order=pp,ep,dp (repeatable)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--nodes", type=_positive_int, metavar="N", help="nodes of parallel.gpus_per_node GPUs each")
    size.add_argument("--world-size", type=_positive_int, metavar="N", help="ranks in all")
    parser.add_argument("--ranks", type=_rank_list, metavar="R,R,...",
                        help="ranks to describe, e.g. 0,17,255 (default: 0 and a few representative ones)")


def config_and_world(args: argparse.Namespace) -> tuple[JobConfig, int, str]:
    """The config of `add_world_arguments`, the world size asked for, and a source for messages."""
    cfg = load_config(args.config, args.set)
    world = args.world_size if args.world_size is not None else args.nodes * cfg.parallel.gpus_per_node
    sets = "".join(f" --set {s}" for s in args.set)
    size = f"--world-size {world}" if args.world_size is not None else f"--nodes {args.nodes} ({world} ranks)"
    return cfg, world, f"{args.config}{sets} with {size}"


def run_layout(args: argparse.Namespace) -> int:
    """Load the config, build its layout on the requested world and print the report."""
    cfg, world, source = config_and_world(args)
    dp = validate_world(cfg, world, source)
    try:
        layout = config_layout(cfg, world, dp)
        report = describe_layout(layout, args.ranks)
        split = describe_split(choose_split(cfg, layout.num_stages, layout.pp), layout.pp)
    except (LayoutError, SplitError) as err:
        # Same form as the main CLI's errors for people: one sentence, no traceback.
        print(f"k2train: error: {source}: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"Layers of the {layout.num_stages} virtual stages (parallel/pipeline/split.py):")
    print(split)
    if args.params:
        from parallel.plan.params import describe_params  # imports torch and the model: only when asked

        print()
        print(describe_params(cfg, layout, args.ranks or representative_ranks(layout)))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        ranks = [-1]
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(
            f"expected ranks as comma-separated whole numbers, e.g. 0,17,255, got {text!r}")
    return ranks

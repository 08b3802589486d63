"""What each rank of a layout holds: its model parts built on the meta device, counted.

Nothing is allocated, so the 1.04T-parameter `k2_1t` can be laid out on a laptop. A rank holds its
virtual stages' dense parameters (replicated on the ep*dp ranks of the stage) and its EP slice of
the experts (replicated on the dp ranks). "Owned" counts a dense parameter only on EP rank 0 of its
stage, so the owned counts of one model-parallel group (the pp*ep ranks of one dp index) add up to
the model's total exactly, while the held counts show what replication costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2train.config.schema import JobConfig
from k2train.model import count_parameters
from parallel.zero1.ownership import is_expert_param
from parallel.layout import Layout, RankCoords
from parallel.pipeline.stages import build_stage_models
from parallel.pipeline.split import choose_split


@dataclass(frozen=True)
class RankParams:
    rank: int
    coords: RankCoords
    dense: int  # parameters of the rank's stages outside the routed experts
    expert: int  # routed-expert parameters of the rank's EP slice
    bytes_per_param: int

    @property
    def held(self) -> int:
        return self.dense + self.expert

    @property
    def owned(self) -> int:
        return self.expert + (self.dense if self.coords.ep == 0 else 0)


def rank_params(cfg: JobConfig, layout: Layout, rank: int) -> RankParams:
    """Build `rank`'s model parts on the meta device and count their parameters."""
    coords = layout.coords(rank)
    split = choose_split(cfg, layout.num_stages, layout.pp)
    with torch.device("meta"):
        parts = build_stage_models(cfg.model, split, layout.stage_indices(coords.pp), coords.ep, layout.ep,
                                   cfg.train.seed)
    dense = expert = 0
    for part in parts:
        for name, param in part.named_parameters():
            if is_expert_param(name):
                expert += param.numel()
            else:
                dense += param.numel()
    itemsize = torch.empty((), dtype=getattr(torch, cfg.train.param_dtype)).element_size()
    return RankParams(rank, coords, dense, expert, itemsize)


def model_parallel_group(layout: Layout, dp: int = 0) -> list[int]:
    """The pp*ep ranks holding one copy of the model (data-parallel index `dp`)."""
    return [layout.rank_of(RankCoords(pp, ep, dp)) for pp in range(layout.pp) for ep in range(layout.ep)]


def describe_params(cfg: JobConfig, layout: Layout, ranks: list[int]) -> str:
    """A table of the chosen ranks, then the sums over model-parallel group 0 against the model total."""
    gib = 1024**3
    lines = [f"Parameters per rank ({cfg.train.param_dtype}, built on the meta device):",
             f"  {'rank':>6} {'pp':>3} {'ep':>3} {'dp':>3} {'dense':>14} {'experts':>16} {'held':>16} {'GiB':>8}"]
    for rank in ranks:
        r = rank_params(cfg, layout, rank)
        lines.append(f"  {rank:>6} {r.coords.pp:>3} {r.coords.ep:>3} {r.coords.dp:>3} {r.dense:>14,} "
                     f"{r.expert:>16,} {r.held:>16,} {r.held * r.bytes_per_param / gib:>8.2f}")
    group = [rank_params(cfg, layout, rank) for rank in model_parallel_group(layout)]
    held, owned = sum(r.held for r in group), sum(r.owned for r in group)
    total, active = count_parameters(cfg.model)
    lines += [
        f"Model-parallel group 0 ({len(group)} ranks = pp {layout.pp} x ep {layout.ep}):",
        f"  owned (dense counted once per stage): {owned:,} = model total {total:,}"
        f" ({'equal' if owned == total else 'MISMATCH'})",
        f"  held: {held:,}; dense weights replicated over ep {layout.ep} add {held - owned:,}"
        f" ({(held - owned) / total:.2%} of the model)",
        f"  largest rank: {max(r.held for r in group):,} parameters"
        f" = {max(r.held for r in group) * group[0].bytes_per_param / gib:.2f} GiB; activated per token: {active:,}",
    ]
    return "\n".join(lines)

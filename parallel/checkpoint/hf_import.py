"""HF safetensors -> a step-0 checkpoint, streamed, on one process or on every rank of a layout.

Each rank writes exactly the checkpoint keys it owns under the target layout, found by the same
code the trainer uses: the rank's model parts (the runner's stage split,
`parallel/stage_split.choose_split`, and `parallel/pipeline.build_stage_models`, built on the meta
device, so no memory), its optimizer items (`parallel/ownership.item_places`) and their
ZeRO-1 owners in its dense (EP x DP) and expert (DP) groups (`parallel/ownership.assign_owners`,
the rank's place in the sorted group as torch numbers it). Router biases are written by the first
rank of each stage's dense group. So a 256-rank import reads the model once, in parallel, and no
rank reads another's tensors or expert rows.

Memory stays bounded: the checkpoint is planned from meta tensors and every tensor is read from
the HF files only when DCP writes it (`LazyTensorPlanner`), one file per tensor, so a rank holds
one tensor (one row block of the embedding or head, one expert's matrix) at a time. Everything
that can be refused is checked before the first byte is written, on all ranks together; a refused
import publishes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from k2train.config.schema import JobConfig
from k2train.model import K2Model
from k2train.model.hf_names import hf_name_of_item, to_hf_name, to_hf_state_dict
from parallel.checkpoint.checkpointer import CheckpointError, Checkpointer, latest_checkpoint, router_bias_key
from parallel.checkpoint.hf_config import check_hf_config
from parallel.checkpoint.hf_fp8 import SCALE_SUFFIX
from parallel.checkpoint.hf_source import HFSource
from parallel.layout import Layout
from parallel.zero1.ownership import assign_owners, is_expert_param, item_places
from parallel.pipeline.stages import build_stage_models
from parallel.pipeline.split import choose_split
from parallel.layout import layout_for


@dataclass(frozen=True)
class Target:
    """One checkpoint key a rank writes: rows `rows` (None: all) of HF tensor `hf_name`."""

    key: str
    hf_name: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # of the checkpoint tensor
    hf_shape: tuple[int, ...]  # of the whole HF tensor


def single_process(cfg: JobConfig) -> JobConfig:
    """The config with a one-rank layout: the checkpoint's keys do not depend on the layout."""
    one = replace(cfg.parallel, pp=1, vp=1, ep=1, dp=1, stage_layers=None)
    return replace(cfg, parallel=one, checkpoint=replace(cfg.checkpoint, async_save=False))


def _target(key: str, shape: tuple[int, ...], full_shape: tuple[int, ...]) -> Target:
    hf_name, rows = hf_name_of_item(key)
    return Target(f"model/{key}", hf_name, rows, shape, shape if rows is None else full_shape)


def rank_targets(cfg: JobConfig, layout: Layout, rank: int) -> list[Target]:
    """The checkpoint keys rank `rank` of `layout` owns, as the trainer's ZeRO-1 assigns them."""
    m, coords = cfg.model, layout.coords(rank)
    split = choose_split(cfg, layout.num_stages, layout.pp)
    with torch.device("meta"):
        parts = build_stage_models(m, split, layout.stage_indices(coords.pp), coords.ep, layout.ep, cfg.train.seed)
    named = [(name, p) for part in parts for name, p in part.named_parameters()]
    first_expert = coords.ep * (m.num_experts // layout.ep)
    targets = []
    for group, params in ((layout.dense_group(rank), [(n, p) for n, p in named if not is_expert_param(n)]),
                          (layout.expert_grad_group(rank), [(n, p) for n, p in named if is_expert_param(n)])):
        places = item_places(params, first_expert, cfg.optimizer.adamw_block_elements)
        owners = assign_owners([place.item for place in places], len(group), cfg.optimizer.ns_steps)
        me = sorted(group).index(rank)
        targets += [_target(place.item.key, place.item.shape, tuple(params[place.position][1].shape))
                    for place, owner in zip(places, owners, strict=True) if owner == me]
    if min(layout.dense_group(rank)) == rank:
        for layer in (layer for part in parts for layer in part.moe_layers()):
            name = f"layers.{layer}.mlp.gate.e_score_correction_bias"
            targets.append(Target(router_bias_key(layer), to_hf_name(name), None, (m.num_experts,), (m.num_experts,)))
    return targets


def expected_hf_names(cfg: JobConfig) -> set[str]:
    """Every tensor name the whole model has in a HF checkpoint (a meta model, no memory)."""
    with torch.device("meta"):
        model = K2Model(cfg.model, seed=cfg.train.seed)
    return set(to_hf_state_dict(model.state_dict()))


def check_source(source: HFSource, cfg: JobConfig, targets: list[Target]) -> None:
    """Refuse missing or unexpected tensors of the whole model (from the index alone) and any
    tensor this rank reads that has another shape or dtype, or FP8 without its scale."""
    expected = expected_hf_names(cfg)
    for name in sorted(expected - source.names()):
        raise CheckpointError(f"{source.directory} lacks {name}, which the config's model has.")
    for name in sorted(source.names() - expected):
        base = name.removesuffix(SCALE_SUFFIX)
        parts = name.split(".")
        # Layers past num_layers are multi-token-prediction modules (DeepSeek-V3 ships one); K2 has none.
        mtp = parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.model.num_layers
        if not mtp and not (name.endswith(SCALE_SUFFIX) and base in expected):
            raise CheckpointError(f"{source.directory} holds {name}, which the config's model does not have.")
    source.load_headers(t.hf_name for t in targets)
    for target in targets:
        source.check(target.hf_name, target.hf_shape)


class LazyTensorPlanner(DefaultSavePlanner):
    """A DCP save plan over meta tensors whose data is read only when the writer asks for it."""

    def __init__(self, read):
        super().__init__()
        self.read = read  # checkpoint key -> tensor, or None for a key held in memory

    def resolve_data(self, write_item):
        tensor = self.read(write_item.index.fqn)
        return super().resolve_data(write_item) if tensor is None else tensor


def import_hf(cfg: JobConfig, directory: Path, out: Path, rank: int = 0, layout: Layout | None = None,
              accepted: tuple[str, ...] = ()) -> Path:
    """Write a step-0 checkpoint (model only) from HF safetensors; returns its directory.

    With `layout`, this process is rank `rank` of it (the process group is up) and writes its own
    keys; without, one process writes all of them.
    """
    cfg = single_process(cfg) if layout is None else replace(cfg, checkpoint=replace(cfg.checkpoint, async_save=False))
    layout = layout_for(cfg, 1) if layout is None else layout
    distributed = layout.world_size > 1
    check_hf_config(directory, cfg.model, accepted)
    source = HFSource(directory)
    targets = rank_targets(cfg, layout, rank)
    problem = ""
    try:
        check_source(source, cfg, targets)
    except CheckpointError as err:
        problem = str(err)
    problems = [problem]
    if distributed:
        problems = [None] * layout.world_size
        dist.all_gather_object(problems, problem)
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    dtype = getattr(torch, cfg.train.param_dtype)
    by_key = {t.key: t for t in targets}

    def read(key: str) -> torch.Tensor | None:
        target = by_key.get(key)
        return None if target is None else source.read(target.hf_name, dtype, target.rows)

    planned = {t.key: torch.empty(t.shape, dtype=dtype, device="meta") for t in targets}
    checkpointer = Checkpointer(cfg, out, rank=rank, distributed=distributed)
    checkpointer.lineage = {}  # imported weights: the first run that trains them starts the lineage
    header = dict(world_size=layout.world_size, pp=layout.pp, vp=layout.vp, ep=layout.ep, dp=layout.dp,
                  source=str(directory))
    checkpointer.save(0, planned, sampler={}, layout=header, planner=LazyTensorPlanner(read), file_per_tensor=True)
    return latest_checkpoint(out)

"""One rank's model parts made parallel, from outside the model, in four steps applied in order.

`build_rank_parts` builds the K2 model parts a rank holds under its layout: its virtual pipeline
stages (the stage split of parallel/pipeline/split.py) holding its EP slice of the experts, on its
device in the parameter dtype, with the memory config's SavePolicy (what FP8 storage and selective
recompute keep for backward, K2 §2.4.3) given to the model as it is built. `parallelize` then applies K2's parallelism (K2 §2.4) to them:
1. experts: every MoE layer exchanges its routed rows with the other EP ranks by all-to-all
   (parallel/experts.py); with parallel.overlap the backward's exchanges run on a group of their own
   and take turns with the forwards (parallel/pipeline/overlap.py);
2. memory: the saved-activation hooks that offload to host memory under the device budget and
   count the bytes (K2 §2.4.3, k2train/memory);
3. pipeline: with pp > 1, the stages wrapped for torch's pipelining and the interleaved schedule
   over the pipeline group (parallel/pipeline/stages.py);
4. optimizer: ZeRO-1 sharded MuonClip over the dense and expert-gradient groups (parallel/zero1).
The runner (parallel/runner.py) drives what comes out; it applies no parallelism itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from k2train.config.checks import micro_batches_per_step
from k2train.config.schema import JobConfig
from k2train.memory.offload import ActivationOffloader
from k2train.memory.policy import SavePolicy
from k2train.memory.saved import SavedActivations
from k2train.model import K2Model
from parallel.experts import apply_expert_parallel
from parallel.pipeline.overlap import Turns, backward_expert_group, check_overlap
from parallel.pipeline.split import choose_split
from parallel.pipeline.stages import PAIRED, StageModule, build_schedule, build_stage_models
from parallel.plan.cost import device_hardware
from parallel.plan.planner import budgeted_offload
from parallel.state import ParallelState
from parallel.zero1.optimizer import ShardedMuonClip


class RankModel(nn.Module):
    """The model parts one rank holds, in stage order, seen as one module by the optimizer."""

    def __init__(self, parts: list[K2Model]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def layer_ids(self) -> list[int]:
        return [i for part in self.parts for i in part.part.layers]

    def moe_layer_ids(self) -> list[int]:
        return [i for part in self.parts for i in part.moe_layers()]

    def moe_rows(self) -> list[int]:
        """The row of each of this rank's MoE layers in the all-layer expert tables ([num_moe_layers, E])."""
        return [i - part.cfg.first_dense_layers for part in self.parts for i in part.moe_layers()]

    def attention_modules(self):
        return [m for part in self.parts for m in part.attention_modules()]

    def router_biases(self) -> list[torch.Tensor]:
        return [b for part in self.parts for b in part.router_biases()]


@dataclass(frozen=True)
class RankParts:
    """The model parts of one rank before any parallelism: one K2Model per virtual stage it holds."""

    split: list[range]          # the layers of every virtual stage of the model
    stage_indices: list[int]    # the virtual stages this rank holds, in order
    parts: list[K2Model]        # one per held stage, holding this rank's EP slice of the experts


@dataclass
class Parallelized:
    """One rank's parts with the parallelism applied: everything the runner drives."""

    split: list[range]
    stage_indices: list[int]
    model: RankModel
    micro_batches: int                      # per sequence rank and optimizer step
    turns: Turns | None                     # parallel.overlap: forwards and backwards take turns
    offloader: ActivationOffloader | None   # memory.activation_offload
    saved: SavedActivations | None          # the saved-activation hooks (offload or accounting)
    offload_keys: set | None                # the (stage, micro-batch) keys a budget offloads; None: all
    stage_modules: list[StageModule] | None  # pp > 1
    trace: list[tuple[str, int]] | None     # the executed stage order, when asked for (tests)
    schedule: object | None                 # torch's pipeline schedule, pp > 1
    optimizer: ShardedMuonClip


def build_rank_parts(cfg: JobConfig, state: ParallelState) -> RankParts:
    """This rank's stages of the model (seeded by train.seed), on its device in train.param_dtype."""
    layout, coords = state.layout, state.coords
    split = choose_split(cfg, layout.num_stages, layout.pp)
    stage_indices = layout.stage_indices(coords.pp)
    parts = build_stage_models(cfg.model, split, stage_indices, coords.ep, layout.ep, cfg.train.seed,
                               SavePolicy.from_config(cfg.memory))
    dtype = getattr(torch, cfg.train.param_dtype)
    for part in parts:
        part.to(device=state.device, dtype=dtype)
    return RankParts(split, stage_indices, parts)


def parallelize(rank: RankParts, state: ParallelState, cfg: JobConfig, *, trace_schedule: bool = False,
                measure_activations: bool = False) -> Parallelized:
    """Apply experts, memory policy, pipeline and optimizer to `rank`'s parts, in that order.

    `trace_schedule` keeps the executed order of stage forwards and backwards; `measure_activations`
    counts the bytes saved per layer also without offload."""
    turns = _apply_experts(rank.parts, state, cfg)
    offloader, saved, offload_keys = _apply_memory(rank, state, cfg, measure_activations)
    micro_batches = micro_batches_per_step(cfg, state.layout.dp)
    stage_modules, trace, schedule = None, None, None
    if state.layout.pp > 1:
        stage_modules, trace, schedule = _apply_pipeline(rank, state, cfg, micro_batches, saved, turns, trace_schedule)
    model = RankModel(rank.parts)
    return Parallelized(rank.split, rank.stage_indices, model, micro_batches, turns, offloader, saved, offload_keys,
                        stage_modules, trace, schedule, _sharded_optimizer(model, state, cfg))


def _apply_experts(parts: list[K2Model], state: ParallelState, cfg: JobConfig) -> Turns | None:
    """Route every MoE layer through the EP group; returns the turns of parallel.overlap (K2 §2.4),
    whose backwards exchange on a group of their own."""
    layout = state.layout
    check_overlap(cfg.parallel.overlap, layout.ep)
    # A zero-bubble pipeline's paired input passes compute no weight gradients: nothing to defer.
    split_backward = PAIRED[cfg.parallel.schedule].split_backward and layout.pp > 1
    # gloo's pipeline receives report completion only once waited on: watched (overlap.Watched).
    watch_receives = state.device.type == "cpu" and layout.pp > 1
    turns = (Turns(cfg.parallel.delay_wgrad and not split_backward, watch_receives=watch_receives)
             if cfg.parallel.overlap != "none" else None)
    backward_group = backward_expert_group(state) if turns is not None else None
    for part in parts:
        apply_expert_parallel(part, state.expert_group, state.coords.ep, layout.ep, backward_group, turns,
                              state.collectives)
    return turns


def _apply_memory(rank: RankParts, state: ParallelState, cfg: JobConfig, measure_activations: bool):
    """With memory.activation_offload (K2 §2.4.3) saved activations wait for backward in host memory
    (under the device budget, only the micro-batches it cannot hold). The same hooks count the bytes
    saved per layer (also without offload, when asked). FP8 storage and selective recompute were
    given to the model as it was built (SavePolicy). Returns (offloader, saved, offload_keys)."""
    offloader = ActivationOffloader(state.device) if cfg.memory.activation_offload else None
    saved = SavedActivations(rank.parts, offloader) if offloader is not None or measure_activations else None
    offload_keys = (budgeted_offload(cfg, state.layout, rank.split, state.coords.pp, device_hardware(state.device))
                    if offloader is not None and cfg.memory.activation_offload_budget_gib is not None else None)
    return offloader, saved, offload_keys


def _apply_pipeline(rank: RankParts, state: ParallelState, cfg: JobConfig, micro_batches: int,
                    saved: SavedActivations | None, turns: Turns | None, trace_schedule: bool):
    """The stages over the pipeline group and the schedule that runs them; returns
    (stage modules, trace, schedule)."""
    layout = state.layout
    trace: list[tuple[str, int]] | None = [] if trace_schedule else None
    stage_modules = [StageModule(part, s, trace, saved) for part, s in zip(rank.parts, rank.stage_indices)]
    schedule = build_schedule(
        stage_modules, rank.stage_indices, layout.num_stages, micro_batches, cfg.parallel.schedule,
        state.pipeline_group, state.device, micro_batch_shape=(cfg.train.micro_batch_size, cfg.data.seq_len),
        turns=turns,
    )
    return stage_modules, trace, schedule


def _sharded_optimizer(model: RankModel, state: ParallelState, cfg: JobConfig) -> ShardedMuonClip:
    """ZeRO-1 MuonClip over this rank's parameters, named as the model names them on every rank."""
    m, layout = cfg.model, state.layout
    return ShardedMuonClip(
        [(model_name(n), p) for n, p in model.named_parameters()], state.coords.ep * (m.num_experts // layout.ep),
        state.dense_group, state.expert_grad_group, cfg.optimizer,
        (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim), state.is_distributed,
        offload=cfg.memory.optimizer_offload, chunk_bytes=cfg.memory.optimizer_chunk_bytes,
        collectives=state.collectives,
    )


def model_name(name: str) -> str:
    """"parts.<k>.layers.3.mlp..." -> "layers.3.mlp...": the model's own name, equal on every rank."""
    return name.split(".", 2)[2]

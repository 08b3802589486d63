"""What one GPU of a layout holds: ZeRO-1 buffers, activations in flight and pipeline buffers.

Two accountings side by side, because the paper's figures and this code's allocations differ:
- "as built": what `parallel/zero1/optimizer.py` (with `parallel/zero1/offload.py`) and torch's
  `PipelineStage` allocate. ZeRO-1 owns items whole (Muon matrices, AdamW parameters or their row
  blocks), so a reduction group's regions are padded to its largest owner's fill, and the FP32
  gradient buffer is group size x region; the pipeline stages hold a receive buffer from its
  posted receive to the compute that consumes it (parallel/pipeline/buffers.py).
- "ideal": the paper's accounting (K2 §2.4): BF16 parameters plus one FP32 gradient per held
  parameter, optimizer states spread evenly over the reduction group and reduce-scattered in
  place, and stage boundary tensors only for the micro-batches in flight.
The ownership is the real one (`parallel/zero1/ownership.py` on the meta-device model parts), so the
"as built" numbers are what the code allocates on every rank, not an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2train.config.schema import JobConfig
from parallel.layout import Layout
from parallel.plan.activations import Saved
from parallel.pipeline.schedule_table import Op, paired_order, rank_order

FP32 = 4


@dataclass(frozen=True)
class GroupBuffers:
    """One gradient-reduction group (parallel/zero1/optimizer.py ShardGroup) as seen from each of its members."""

    size: int
    held_muon: int  # elements of the group's Muon items held by every member
    held_adamw: int
    region: int  # padded owner region: the largest owner's elements (at least 1)
    owned: tuple[int, ...]  # per member: owned elements
    owned_adamw: tuple[int, ...]  # per member: owned elements of AdamW items
    widest_chunk: tuple[tuple[int, int], ...]  # per member: (elements, AdamW elements) of its widest chunk
    ns_flops: tuple[int, ...]  # per member: Newton-Schulz FLOPs per step
    largest_item: tuple[str, int]  # (key, elements) of the group's largest item

    @property
    def held(self) -> int:
        return self.held_muon + self.held_adamw

    def grads_bytes(self) -> int:
        """The FP32 gradient buffer: one padded region per member."""
        return FP32 * self.size * self.region

    def owner_bytes(self, member: int, offload: bool) -> tuple[int, int]:
        """(device, host) bytes of grad_region, master weights and moments of `member`. A group of
        one reduces in place: its grad_region is the gradient buffer, no second copy."""
        from parallel.zero1.offload import RING  # device buffer sets of the offloaded states

        states = FP32 * (2 * self.owned[member] + self.owned_adamw[member])
        region = FP32 * self.region if self.size > 1 else 0
        if offload:
            n, m2 = self.widest_chunk[member]
            return region + RING * FP32 * (2 * n + m2), states
        # The master spans the padded region (it is the all_gather input for FP32 parameters).
        return region + states + FP32 * (self.region - self.owned[member]), 0

    def gather_bytes(self, param_bytes: int, offload: bool) -> int:
        """Transient of the parameter all_gather: the gathered group regions and this owner's cast."""
        gathered = self.size * self.region * param_bytes if self.size > 1 else 0
        cast = self.region * param_bytes if (offload or param_bytes != FP32) else 0
        return gathered + cast

    def ideal_bytes(self) -> tuple[int, int]:
        """(gradient buffer, optimizer states) per member when shards are even and in place."""
        states = (self.held_muon * 2 * FP32 + self.held_adamw * 3 * FP32) // self.size
        return FP32 * self.held, states


def _group(items, size: int, ns_steps: int, chunk_bytes: int) -> GroupBuffers:
    from parallel.zero1.offload import plan_chunks
    from parallel.zero1.ownership import assign_owners, item_cost

    owners = assign_owners(items, size, ns_steps)
    owned = [[] for _ in range(size)]
    for item, owner in zip(items, owners):
        owned[owner].append(item)
    widest = []
    for mine in owned:
        chunks = plan_chunks([(item.numel, item.muon) for item in mine], chunk_bytes)
        widest.append(max(((c.hi - c.lo, c.m2_hi - c.m2_lo) for c in chunks), default=(0, 0)))
    fills = [sum(item.numel for item in mine) for mine in owned]
    return GroupBuffers(
        size=size,
        held_muon=sum(item.numel for item in items if item.muon),
        held_adamw=sum(item.numel for item in items if not item.muon),
        region=max(max(fills), 1),
        owned=tuple(fills),
        owned_adamw=tuple(sum(item.numel for item in mine if not item.muon) for mine in owned),
        widest_chunk=tuple(widest),
        ns_flops=tuple(sum(item_cost(item, ns_steps) for item in mine if item.muon) for mine in owned),
        largest_item=max(((item.key, item.numel) for item in items), key=lambda kv: kv[1], default=("", 0)),
    )


def zero1_groups(cfg: JobConfig, layout: Layout, split: list[range],
                 ranks: list[int] | None = None) -> dict[int, tuple[GroupBuffers, GroupBuffers]]:
    """(dense group, expert group) of every pipeline rank (or of `ranks`), from its parts built on the meta device.

    Dense items are the same on every EP rank of a stage, and expert items have the same shapes,
    so EP rank 0 stands for all (the assignment looks at shapes only).
    """
    import torch

    from parallel.zero1.ownership import is_expert_param, items_of
    from parallel.pipeline.stages import build_stage_models

    groups = {}
    for pp in range(layout.pp) if ranks is None else ranks:
        with torch.device("meta"):
            parts = build_stage_models(cfg.model, split, layout.stage_indices(pp), 0, layout.ep, cfg.train.seed)
        named = [(n, p) for part in parts for n, p in part.named_parameters()]
        blocks = cfg.optimizer.adamw_block_elements
        dense = items_of([(n, p) for n, p in named if not is_expert_param(n)], 0, blocks)
        expert = items_of([(n, p) for n, p in named if is_expert_param(n)], 0, blocks)
        chunk = cfg.memory.optimizer_chunk_bytes
        groups[pp] = (_group(dense, layout.sequence_ranks, cfg.optimizer.ns_steps, chunk),
                      _group(expert, layout.dp, cfg.optimizer.ns_steps, chunk))
    return groups


@dataclass(frozen=True)
class InFlight:
    """One pipeline rank's activations at the schedule's activation peak."""

    device: int  # saved activations on the device (integer ones only with offload, plus its working set)
    host: int  # offloaded saved activations
    outputs: int  # stage outputs the runtime keeps until their backward
    inputs: int  # received inputs of the micro-batches in flight
    counts: dict[int, int]  # micro-batches in flight per stage


def schedule_ops(pp: int, vp: int, micro_batches: int, rank: int, paired: bool = False) -> list[tuple[str, int]]:
    """(kind, stage) of this pipeline rank's forwards and backwards in schedule order.

    The order is `schedule_table.rank_order`, the interleaved 1F1B (the zero-bubble variant is
    counted with the same order); with one pipeline rank it runs each micro-batch's forward and
    backward back to back, as parallel/runner.py `_run_local` does. With `paired` (parallel.overlap) it
    is `schedule_table.paired_order`, a pair's forward counted before its backward frees: one more
    micro-batch in flight, the memory price of the overlap.
    """
    return [(op.kind, op.stage) for step in schedule_steps(pp, vp, micro_batches, rank, paired) for op in step]


def schedule_steps(pp: int, vp: int, micro_batches: int, rank: int, paired: bool) -> list[tuple[Op, ...]]:
    """This pipeline rank's steps in schedule order: `paired_order` with `paired`, otherwise each
    operation of `rank_order` a step of its own."""
    if paired:
        return paired_order(pp, vp, micro_batches, rank)
    return [(op,) for op in rank_order(pp, vp, micro_batches, rank)]


def in_flight_peak(ops: list[tuple[str, int]], saved: dict[int, Saved], boundary: dict[int, tuple[int, int]],
                   offload: bool, prefetch: bool = True) -> InFlight:
    """Walk the schedule: a forward adds its stage's saved bytes, its output and its received input
    (`boundary[stage]` = (input, output) bytes), its backward frees them. Input gradients are freed
    once sent (torch's `stage_backward`), so they are not counted.

    With offload the floating-point bytes wait in host memory (`saved[s].floating`: what the
    offloader copies, `plan_activations.stage_offloaded`). k2train/memory/offload.py brings a
    micro-batch's tensors back as one group when its backward begins and, with `prefetch` (a
    pipeline schedule, where the next backward's forward has run), the next backward's group too,
    K2 §2.4.3: one or two stage-micro-batches' worth are the device working set."""
    kept = {s: saved[s].on_device if offload else saved[s].total for s in saved}
    per_forward = {s: kept[s] + boundary[s][0] + boundary[s][1] for s in saved}
    count = {s: 0 for s in saved}
    level = 0
    best, best_counts = -1, dict(count)
    for kind, stage in ops:
        sign = 1 if kind == "F" else -1
        count[stage] += sign
        level += sign * per_forward[stage]
        if level > best:
            best, best_counts = level, dict(count)
    working = (2 if prefetch else 1) * max(v.floating for v in saved.values()) if offload else 0
    return InFlight(
        device=sum(best_counts[s] * kept[s] for s in saved) + working,
        host=sum(best_counts[s] * saved[s].floating for s in saved) if offload else 0,
        outputs=sum(best_counts[s] * boundary[s][1] for s in saved),
        inputs=sum(best_counts[s] * boundary[s][0] for s in saved),
        counts=best_counts,
    )


@dataclass(frozen=True)
class PipelineBuffers:
    """Stage boundary buffers of one pipeline rank during the step (bytes)."""

    receive: int  # as built: stage-input receive buffers alive at the rank's receive-buffer peak
    grad_receive: int  # as built: stage-output gradient receive buffers alive at that peak
    batch: int  # the step's token ids (first stage) and labels (last stage)
    peak: int = 0  # receive buffers alive at that peak (of 2 per micro-batch and receiving stage)


def pipeline_buffers(stages: list[int], num_stages: int, micro_batches: int, boundary: int,
                     tokens_per_micro_batch: int) -> PipelineBuffers:
    """Receive buffers exist from the posted receive to the compute that consumes it
    (parallel/pipeline/buffers.py); the peak is walked on the runtime's lowering of the interleaved
    1F1B table (the zero-bubble variant, which keeps them until its weight pass, is counted with
    the same order). `stages` are the rank's virtual stages r, r + pp, ..."""
    from parallel.pipeline.buffers import interleaved_1f1b_peaks

    batch = 8 * tokens_per_micro_batch * micro_batches
    if num_stages == 1:
        return PipelineBuffers(0, 0, 2 * batch)
    vp = len(stages)
    peak = interleaved_1f1b_peaks(num_stages // vp, vp, micro_batches)[stages[0]]
    ends = sum(s == 0 for s in stages) + sum(s == num_stages - 1 for s in stages)
    return PipelineBuffers(peak.inputs * boundary, peak.grads * boundary, batch * ends, peak.count)

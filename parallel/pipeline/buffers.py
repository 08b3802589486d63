"""Pipeline receive buffers that exist only while their micro-batch needs them.

torch's `PipelineStage` (torch 2.13, torch/distributed/pipelining/stage.py) allocates, when a
schedule first runs, a receive buffer for the stage input of every micro-batch of the step
(`_setup_forward_recv_info`) and one for the gradient of the stage output (`_create_grad_recv_info`),
and keeps them all from step to step. With K2's 1024 micro-batches per pipeline rank at 32 nodes
(K2 §2.4: PP16 x EP16, dp 1) that is 2 x 1024 hidden-state tensors of [1, 4096, 7168] bf16 per
virtual stage, about 224 GiB per GPU, where only the micro-batches in flight need one.

`LeanReceiveStage` keeps torch's receive descriptors (`_RecvInfo`) with a meta-device placeholder
in place of the buffer. A buffer is allocated when the schedule posts its receive
(`get_fwd_recv_ops`, `get_bwd_recv_ops`), and the stage drops its reference as soon as the compute
that reads it has run: the forward for an input, the backward (or its input half) for a gradient.
Nothing is freed explicitly: the tensor lives on exactly as long as torch's own caches hold it.
The received input is the forward's saved input (`fwd_cache`) until the micro-batch's backward;
the zero-bubble schedule keeps input and gradient in `backward_state` until the weight pass, which
on the first stage recomputes the whole backward from that gradient. So no pass can see a buffer
whose memory has been returned.

Receives are posted where torch's lowering of the compute schedule places them (`_add_send_recv`):
when the sending rank runs the compute that produces the tensor, often several actions before this
rank's forward. `receive_buffer_peak` walks a lowered action list to the number of buffers alive
at once; `lowered_interleaved_1f1b` lowers the interleaved 1F1B table (parallel/pipeline/schedule_table.py)
as the runtime does, so `k2train plan` counts the buffers the runtime allocates.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import _make_tensor_from_meta
from torch.distributed.pipelining.schedules import _Action, _add_reduce_grad, _add_send_recv, _ComputationType
from torch.distributed.pipelining.stage import _RecvInfo
from torch.multiprocessing.reductions import StorageWeakRef

from parallel.pipeline.schedule_table import rank_order

# The PipelineStage methods overridden below, as torch 2.13 defines them.
_OVERRIDDEN = ("_setup_forward_recv_info", "_create_grad_recv_info", "get_fwd_recv_ops", "get_bwd_recv_ops",
               "forward_one_chunk", "backward_one_chunk")


@dataclass
class ReceivePeak:
    """The most receive buffers one pipeline rank holds at once during a step."""

    count: int = 0  # input and gradient buffers together, at the rank's peak
    inputs: int = 0  # of which stage inputs
    grads: int = 0  # of which stage-output gradients
    by_stage: dict[tuple[int, str], int] = field(default_factory=dict)  # (stage, "input"/"grad") -> its own peak

    def note(self, alive: dict[tuple[int, str], int]) -> None:
        """Take the counts alive now (per stage and kind) into the peaks."""
        for key, n in alive.items():
            self.by_stage[key] = max(self.by_stage.get(key, 0), n)
        total = sum(alive.values())
        if total > self.count:
            self.count = total
            self.inputs = sum(n for (_, kind), n in alive.items() if kind == "input")
            self.grads = total - self.inputs


class ReceiveBufferLog:
    """The receive buffers of one pipeline rank's stages, followed by weak references to their
    storage: a buffer counts as alive until its memory is released, whoever held it last."""

    def __init__(self):
        self._alive: list[tuple[int, str, StorageWeakRef, int]] = []  # (stage, kind, storage, bytes)
        self.peak = ReceivePeak()
        self.peak_bytes = (0, 0)  # (input, gradient) bytes at the rank's peak
        self.allocations = 0

    def reset(self) -> None:
        """Start counting peaks afresh (buffers alive now stay followed)."""
        self.peak, self.peak_bytes, self.allocations = ReceivePeak(), (0, 0), 0

    def alive(self) -> list[tuple[int, str]]:
        """(stage, kind) of every receive buffer whose memory is still held."""
        self._alive = [entry for entry in self._alive if not entry[2].expired()]
        return [(stage, kind) for stage, kind, _, _ in self._alive]

    def allocated(self, stage: int, kind: str, buffer: torch.Tensor) -> None:
        self.alive()
        self._alive.append((stage, kind, StorageWeakRef(buffer.untyped_storage()), buffer.nbytes))
        self.allocations += 1
        counts: dict[tuple[int, str], int] = {}
        for s, k, _, _ in self._alive:
            counts[(s, k)] = counts.get((s, k), 0) + 1
        before = self.peak.count
        self.peak.note(counts)
        if self.peak.count > before:
            self.peak_bytes = (sum(n for _, k, _, n in self._alive if k == "input"),
                               sum(n for _, k, _, n in self._alive if k == "grad"))


class LeanReceiveStage(PipelineStage):
    """torch's PipelineStage whose receive buffers live from the posted receive to the compute
    that consumes them (see the module docstring). Written against torch 2.13's stage.py; `log`
    (shared by the stages of a pipeline rank) counts the buffers alive."""

    def __init__(self, *args, log: ReceiveBufferLog | None = None, **kwargs):
        missing = [name for name in _OVERRIDDEN if not hasattr(PipelineStage, name)]
        if missing:
            raise RuntimeError(f"parallel/pipeline/buffers.py overrides PipelineStage methods of torch 2.13, but torch "
                               f"{torch.__version__} has no {', '.join(missing)}; the receive-buffer lifecycle "
                               f"needs porting to this torch.")
        super().__init__(*args, **kwargs)
        self.log = log if log is not None else ReceiveBufferLog()

    # -- descriptors without memory ----------------------------------------------------------

    def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
        # torch's descriptors for one micro-batch (its one buffer is dropped at once), copied to all.
        super()._setup_forward_recv_info(1, has_backward)
        template = tuple(_placeholder(info) for info in self.args_recv_info[0])
        for chunk in range(num_microbatches):
            self.args_recv_info[chunk] = tuple(copy.copy(info) for info in template)

    def _create_grad_recv_info(self, act_send_info: dict) -> tuple[_RecvInfo, ...]:
        return tuple(_placeholder(info) for info in super()._create_grad_recv_info(act_send_info))

    # -- allocate when the receive is posted -------------------------------------------------

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        self._allocate(self.args_recv_info[fwd_chunk_id], "input", fwd_chunk_id)
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        if self.has_backward and not self.is_last:
            self._allocate(self.grad_recv_info[bwd_chunk_id], "grad", bwd_chunk_id)
        return super().get_bwd_recv_ops(bwd_chunk_id)

    # -- drop the stage's reference once consumed ----------------------------------------------

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        # fwd_cache holds the input (the autograd leaf) until this micro-batch's backward.
        _release(self.args_recv_info[fwd_chunk_id])
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward)
        # A split backward keeps the gradient in backward_state for its weight pass.
        _release(self.grad_recv_info.get(bwd_chunk_id, ()))
        if full_backward and loss is not None and loss._base is None:
            # The schedule keeps every micro-batch's loss until the step ends; through its graph's
            # gradient accumulator the loss would keep this stage's input alive that long. (The
            # input half of a split backward detaches the loss itself.)
            loss.detach_()

    def _allocate(self, infos: tuple[_RecvInfo, ...], kind: str, chunk: int) -> None:
        for info in infos:
            if info.is_root_arg or info.tensor_meta is None:
                continue  # the first stage's token ids come with the step; None gradients are not sent
            if info.buffer is not None and not info.buffer.is_meta:
                raise RuntimeError(f"stage {self.stage_index}: the {kind} receive buffer of micro-batch {chunk} is "
                                   f"already allocated before its receive is posted; torch {torch.__version__} "
                                   f"allocates receive buffers outside the methods parallel/pipeline/buffers.py "
                                   f"overrides (written against torch 2.13).")
            info.buffer = _make_tensor_from_meta(info.tensor_meta, self.device)
            self.log.allocated(self.stage_index, kind, info.buffer)


def _placeholder(info: _RecvInfo) -> _RecvInfo:
    """A copy of `info` whose buffer (if it has one) is a meta tensor of the same shape: no memory,
    and what torch reads between steps (`clear_runtime_states` clears `.grad`) stays valid."""
    info = copy.copy(info)
    _release((info,))
    return info


def _release(infos: Sequence[_RecvInfo]) -> None:
    for info in infos:
        if not info.is_root_arg and info.buffer is not None and info.tensor_meta is not None:
            info.buffer = _make_tensor_from_meta(info.tensor_meta, "meta")


# ---- the schedule's receive buffers, without running it -------------------------------------

C = _ComputationType


def receive_buffer_peak(actions: Sequence[_Action]) -> ReceivePeak:
    """Walk one rank's lowered actions: a RECV_F or RECV_B allocates a buffer of its stage and
    micro-batch; the full backward frees both of them, or, when the backward is split, the weight
    pass (torch's backward_state holds them until then)."""
    alive: dict[tuple[int, str], set[int]] = {}
    peak = ReceivePeak()
    for action in actions:
        for a in action.sub_actions or (action,):
            stage, mb, kind = a.stage_index, a.microbatch_index, a.computation_type
            if kind in (C.RECV_F, C.RECV_B):
                alive.setdefault((stage, "input" if kind == C.RECV_F else "grad"), set()).add(mb)
                peak.note({key: len(mbs) for key, mbs in alive.items()})
            elif kind in (C.FULL_BACKWARD, C.BACKWARD_WEIGHT):
                for key in ((stage, "input"), (stage, "grad")):
                    alive.get(key, set()).discard(mb)
    return peak


def with_unshard_reshard(actions: Sequence[_Action | None], max_active_stages: int = 3) -> list[_Action]:
    """torch 2.13's `_add_unshard_reshard` (schedules.py) in linear time: idle steps dropped, an
    UNSHARD before the first action of each of the next `max_active_stages` stages to compute, a
    RESHARD for an active stage that is not among them, and for every stage still active at the
    end. torch's own pass rescans the rest of the
    list at every action, quadratic: seconds per rank for k2_1t's 4096 actions. The runtime's
    lowering runs it, and the placement of the receives depends on it."""
    compute = [a for a in actions if a is not None]
    upcoming: dict[int, deque[int]] = {}
    for i, a in enumerate(compute):
        if a.sub_actions is not None:
            raise ValueError(f"action {a} has sub-actions; with_unshard_reshard takes plain compute actions.")
        upcoming.setdefault(a.stage_index, deque()).append(i)
    active: set[int] = set()
    out: list[_Action] = []
    for i, a in enumerate(compute):
        for positions in upcoming.values():
            while positions and positions[0] < i:
                positions.popleft()
        nearest = sorted((positions[0], s) for s, positions in upcoming.items() if positions)
        next_n = [s for _, s in nearest[:max_active_stages]]
        fetch = [s for s in next_n if s not in active]
        evict = [s for s in active if s not in next_n]
        for s in evict:
            active.remove(s)
            out.append(_Action(s, C.RESHARD, None))
        for s in fetch:
            active.add(s)
            out.append(_Action(s, C.UNSHARD, None))
        out.append(a)
    out += [_Action(s, C.RESHARD, None) for s in list(active)]
    return out


def lower(compute: dict[int, list[_Action | None]], pp: int, num_stages: int,
          micro_batches: int) -> dict[int, list[_Action]]:
    """The action lists the runtime executes for a compute-only schedule, as torch 2.13's
    `_PipelineScheduleRuntime._prepare_schedule_with_comms` builds them (looped stage placement)."""
    lists = {rank: _add_reduce_grad(with_unshard_reshard(actions), micro_batches) for rank, actions in compute.items()}
    return _add_send_recv(lists, stage_to_rank=lambda s: s % pp, num_stages=num_stages)


def interleaved_1f1b_actions(pp: int, vp: int, micro_batches: int) -> dict[int, list[_Action]]:
    """The compute actions of every rank in the interleaved 1F1B table's order (schedule_table.py)."""
    kinds = {"F": C.FORWARD, "B": C.FULL_BACKWARD}
    return {rank: [_Action(op.stage, kinds[op.kind], op.microbatch) for op in rank_order(pp, vp, micro_batches, rank)]
            for rank in range(pp)}


@lru_cache(maxsize=8)
def interleaved_1f1b_peaks(pp: int, vp: int, micro_batches: int) -> tuple[ReceivePeak, ...]:
    """Per pipeline rank, the receive buffers alive at once under the interleaved 1F1B runtime
    (cached: read them, do not change them)."""
    lowered = lower(interleaved_1f1b_actions(pp, vp, micro_batches), pp, pp * vp, micro_batches)
    return tuple(receive_buffer_peak(lowered[rank]) for rank in range(pp))

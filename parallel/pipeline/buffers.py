"""Pipeline receive buffers that exist only while their micro-batch needs them.

torch's `PipelineStage` (torch 2.13, torch/distributed/pipelining/stage.py) allocates, when a
schedule first runs, a receive buffer for the stage input of every micro-batch of the step
(`_setup_forward_recv_info`) and one for the gradient of the stage output (`_create_grad_recv_info`),
and keeps them all from step to step. With K2's 1024 micro-batches per pipeline rank at 32 nodes
(K2 §2.4: PP16 x EP16, dp 1) that is 2 x 1024 hidden-state tensors of [1, 4096, 7168] bf16 per
virtual stage, about 224 GiB per GPU, where only the micro-batches in flight need one.

`LeanReceiveStage` (parallel/pipeline/torch_compat.py, beside torch's other private hooks) keeps
torch's receive descriptors (`_RecvInfo`) with a meta-device placeholder in place of the buffer. A
buffer is allocated when the schedule posts its receive (`get_fwd_recv_ops`, `get_bwd_recv_ops`),
and the stage drops its reference as soon as the compute that reads it has run: the forward for an
input, the backward (or its input half) for a gradient.
Nothing is freed explicitly: the tensor lives on exactly as long as torch's own caches hold it.
The received input is the forward's saved input (`fwd_cache`) until the micro-batch's backward;
the zero-bubble schedule keeps input and gradient in `backward_state` until the weight pass, which
on the first stage recomputes the whole backward from that gradient. So no pass can see a buffer
whose memory has been returned.

Receives are posted where torch's lowering of the compute schedule places them (`_add_send_recv`):
when the sending rank runs the compute that produces the tensor, often several actions before this
rank's forward. `receive_buffer_peak` walks a lowered action list to the number of buffers alive
at once; `interleaved_1f1b_peaks` lowers the interleaved 1F1B table (parallel/pipeline/schedule_table.py)
as the runtime does (torch_compat.py `lower`), so `k2train plan` counts the buffers the runtime allocates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from parallel.pipeline.schedule_table import rank_order
from parallel.pipeline.torch_compat import Action, ComputationType, lower, to_action


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


# ---- the schedule's receive buffers, without running it -------------------------------------

C = ComputationType


def receive_buffer_peak(actions: Sequence[Action]) -> ReceivePeak:
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


def interleaved_1f1b_actions(pp: int, vp: int, micro_batches: int) -> dict[int, list[Action]]:
    """The compute actions of every rank in the interleaved 1F1B table's order (schedule_table.py)."""
    return {rank: [to_action(op) for op in rank_order(pp, vp, micro_batches, rank)] for rank in range(pp)}


@lru_cache(maxsize=8)
def interleaved_1f1b_peaks(pp: int, vp: int, micro_batches: int) -> tuple[ReceivePeak, ...]:
    """Per pipeline rank, the receive buffers alive at once under the interleaved 1F1B runtime
    (cached: read them, do not change them)."""
    lowered = lower(interleaved_1f1b_actions(pp, vp, micro_batches), pp, pp * vp, micro_batches)
    return tuple(receive_buffer_peak(lowered[rank]) for rank in range(pp))

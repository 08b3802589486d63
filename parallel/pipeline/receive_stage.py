"""A pipeline stage whose receive buffers live only from the posted receive to the compute that
consumes them (why: parallel/pipeline/buffers.py).

torch's `PipelineStage` allocates every micro-batch's receive buffers up front; `LeanReceiveStage`
overrides six of its methods so that a buffer exists only while its micro-batch needs it. The
private torch names it needs come through parallel/pipeline/torch_compat.py, whose version gate
checks them (and these methods' signatures).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch.distributed.pipelining import PipelineStage

from parallel.pipeline.torch_compat import RecvInfo, make_tensor_from_meta


class LeanReceiveStage(PipelineStage):
    """torch's PipelineStage whose receive buffers live from the posted receive to the compute
    that consumes them (parallel/pipeline/buffers.py). `log` (shared by the stages of a pipeline
    rank, buffers.py `ReceiveBufferLog`) counts the buffers alive."""

    def __init__(self, *args, log, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    # -- descriptors without memory ----------------------------------------------------------

    def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
        # torch's descriptors for one micro-batch (its one buffer is dropped at once), copied to all.
        super()._setup_forward_recv_info(1, has_backward)
        template = tuple(_placeholder(info) for info in self.args_recv_info[0])
        for chunk in range(num_microbatches):
            self.args_recv_info[chunk] = tuple(copy.copy(info) for info in template)

    def _create_grad_recv_info(self, act_send_info: dict) -> tuple[RecvInfo, ...]:
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

    def _allocate(self, infos: tuple[RecvInfo, ...], kind: str, chunk: int) -> None:
        for info in infos:
            if info.is_root_arg or info.tensor_meta is None:
                continue  # the first stage's token ids come with the step; None gradients are not sent
            if info.buffer is not None and not info.buffer.is_meta:
                raise RuntimeError(f"stage {self.stage_index}: the {kind} receive buffer of micro-batch {chunk} is "
                                   f"already allocated before its receive is posted; torch {torch.__version__} "
                                   f"allocates receive buffers outside the methods LeanReceiveStage "
                                   f"(parallel/pipeline/torch_compat.py) overrides.")
            info.buffer = make_tensor_from_meta(info.tensor_meta, self.device)
            self.log.allocated(self.stage_index, kind, info.buffer)


def _placeholder(info: RecvInfo) -> RecvInfo:
    """A copy of `info` whose buffer (if it has one) is a meta tensor of the same shape: no memory,
    and what torch reads between steps (`clear_runtime_states` clears `.grad`) stays valid."""
    info = copy.copy(info)
    _release((info,))
    return info


def _release(infos: Sequence[RecvInfo]) -> None:
    for info in infos:
        if not info.is_root_arg and info.buffer is not None and info.tensor_meta is not None:
            info.buffer = make_tensor_from_meta(info.tensor_meta, "meta")

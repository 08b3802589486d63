"""Pipeline parallelism: the model split into PP x VP virtual stages, run by torch's interleaved
schedules (K2 §2.4: interleaved 1F1B; the zero-bubble variant splits the weight-gradient pass out).

Stage s of S = pp * vp holds a contiguous run of layers; stage 0 also holds the embedding and stage
S-1 the final norm, the head and the loss. Pipeline rank r runs the virtual stages r, r+pp, ...
(the looped placement torch's interleaved schedules expect). The schedule classes and the stage
with lean receive buffers reach into torch's private pipelining code, so they live in
parallel/pipeline/torch_compat.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import ScheduleInterleavedZeroBubble

from k2train.config.schema import ModelConfig
from k2train.memory.policy import SavePolicy
from k2train.memory.saved import SavedActivations
from k2train.model import K2Model, ModelPart
from parallel.pipeline.overlap import Turns
from parallel.pipeline.torch_compat import (
    ComputationType,
    PairedInterleaved1F1B,
    PairedInterleavedZeroBubble,
    TheoryInterleaved1F1B,
    lone_backward,
    overlap_forward_backward,
)
from parallel.pipeline.buffers import ReceiveBufferLog
from parallel.pipeline.hooks import ObservedStage, StageLoss


PAIRED = {"interleaved_1f1b": PairedInterleaved1F1B, "interleaved_zero_bubble": PairedInterleavedZeroBubble}


SCHEDULES = {"interleaved_1f1b": TheoryInterleaved1F1B, "interleaved_zero_bubble": ScheduleInterleavedZeroBubble}


class _TraceBackward(torch.autograd.Function):
    """Identity whose backward notes that the stage's backward began (for the executed-schedule trace)."""

    @staticmethod
    def forward(ctx, x, trace: list, stage: int):
        ctx.trace, ctx.stage = trace, stage
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.trace.append(("B", ctx.stage))
        return grad, None, None


class StageModule(nn.Module):
    """One virtual stage as torch's PipelineStage wants it: tensor in, tensor out.

    The per-head max logits and expert loads of every micro-batch are kept on the side (a running
    max and a sum) for the step's QK-Clip and router-bias update. With a `trace` list, the stage
    also records when its forward and backward passes actually run.
    """

    def __init__(self, model: K2Model, stage: int, trace: list | None = None, saved: SavedActivations | None = None):
        super().__init__()
        self.model = model
        self.stage = stage
        self.trace = trace
        # Saved-tensor hooks (activation offload, byte accounting); micro-batch m of this stage is
        # the key (stage, m): forwards, like backwards, run in micro-batch order on a stage.
        self.saved = saved
        self.reset_stats()

    def reset_stats(self) -> None:
        cfg = self.model.cfg
        self.forwards = 0
        self.max_logits_LH = torch.full((len(self.model.part.layers), cfg.num_heads), float("-inf"))
        self.counts_ME = torch.zeros(len(self.model.moe_layers()), cfg.num_experts, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.stage, self.forwards)
        self.forwards += 1
        if self.saved is None:
            out = self.model(x)
        else:
            with self.saved.record(key, tokens=x.shape[0] * x.shape[1]):
                out = self.model(x)
            out.output = self.saved.mark_backward_start(out.output, key)
        with torch.no_grad():
            self.max_logits_LH = torch.maximum(self.max_logits_LH.to(x.device), out.max_logits_LH)
            self.counts_ME = self.counts_ME.to(x.device) + out.expert_counts_ME
        if self.trace is None:
            return out.output
        self.trace.append(("F", self.stage))
        return _TraceBackward.apply(out.output, self.trace, self.stage)


def build_stage_models(
    cfg: ModelConfig, split: list[range], stage_indices: Sequence[int], ep_rank: int, ep_size: int, seed: int,
    policy: SavePolicy = SavePolicy(),
) -> list[K2Model]:
    """The model parts of this rank's virtual stages, holding its EP slice of the experts, saving
    for backward what `policy` says."""
    num_local = cfg.num_experts // ep_size
    return [
        K2Model(
            cfg,
            ModelPart(split[s], embedding=s == 0, head=s == len(split) - 1,
                      first_expert=ep_rank * num_local, num_local_experts=num_local),
            seed=seed,
            policy=policy,
        )
        for s in stage_indices
    ]


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch, in float32."""
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten())


def build_schedule(
    stage_modules: list[StageModule], stage_indices: Sequence[int], num_stages: int, n_microbatches: int,
    schedule: str, group, device: torch.device, micro_batch_shape: tuple[int, int], loss_fn: Callable = lm_loss,
    turns: Turns | None = None,
):
    """PipelineStages over `group` and the interleaved schedule that runs them.

    Gradients leave the parameters as they accumulate (parallel/zero1/optimizer.py), so the schedule does
    not scale them; the optimizer's reduction divides by the micro-batch count. The stages' input
    and output shapes are given up front: shape inference would run an extra forward on real data.
    The stages allocate a receive buffer only while its micro-batch needs it
    (parallel/pipeline/buffers.py); one log, `stage.log`, counts those of all of this rank's stages.
    With `turns` (parallel.overlap), the interleaved 1F1B runs its steady state as forward/backward
    pairs (parallel/pipeline/torch_compat.py `overlap_forward_backward`).
    """
    log = ReceiveBufferLog()
    stages = [
        ObservedStage(module, s, num_stages, device, group=group, log=log,
                      **_stage_io(module, s, num_stages, micro_batch_shape))
        for module, s in zip(stage_modules, stage_indices, strict=True)
    ]
    loss_fn = StageLoss(loss_fn, stages)  # observed with the last stage (parallel/pipeline/hooks.py)
    if turns is None:
        return SCHEDULES[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    paired = PAIRED[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    paired.register_custom_function(ComputationType.OVERLAP_F_B, overlap_forward_backward(turns))
    if turns.delay_wgrad:  # the unpaired full backwards defer their experts' weight gradients too
        paired.register_custom_function(ComputationType.FULL_BACKWARD, lone_backward(turns))
    return paired


def _stage_io(module: StageModule, stage: int, num_stages: int, micro_batch_shape: tuple[int, int]) -> dict:
    """Shape-only (meta) examples of a stage's input and output for one micro-batch [B, S]."""
    cfg = module.model.cfg
    dtype = next(module.parameters()).dtype
    # requires_grad marks the activations that carry gradients between stages (tokens do not).
    hidden = torch.empty(*micro_batch_shape, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch_shape, dtype=torch.int64, device="meta")
    logits = torch.empty(*micro_batch_shape, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    return dict(
        input_args=(tokens if stage == 0 else hidden,),
        output_args=(logits if stage == num_stages - 1 else hidden,),
    )

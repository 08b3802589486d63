"""Named hooks on a pipeline rank's compute, for observers such as the profiler
(parallel/profiling/instrument.py), so that nothing has to patch torch's schedule.

torch's schedule runs each action as one call of a stage's `forward_one_chunk`,
`backward_one_chunk` (a full backward, or the input half of a split one) or
`backward_weight_one_chunk`, and computes the last stage's loss right after that stage's forward,
outside the stage, through the loss function it was given. `ObservedStage` enters its `observer`
around each of these calls as `observer(kind, stage, microbatch)` with kind "F", "B", "I" or "W",
and `StageLoss` (the schedule's loss function) enters the last stage's observer as ("loss", stage,
micro-batch of that stage's latest forward). Without an observer each costs one call.
The runner (parallel/runner.py `observe_step`) sets one observer on its stages and enters the same
one around its own phases: the schedule step, the gradient reduction, and without a pipeline each
forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from parallel.pipeline.receive_stage import LeanReceiveStage

# observer(kind, stage, microbatch) -> a context entered around the action.
ActionObserver = Callable[[str, int | None, int | None], AbstractContextManager]


def observed(observer: ActionObserver | None, kind: str, stage: int | None = None,
             microbatch: int | None = None) -> AbstractContextManager:
    """`observer`'s context for one action, or a context that does nothing."""
    return nullcontext() if observer is None else observer(kind, stage, microbatch)


class ObservedStage(LeanReceiveStage):
    """A pipeline stage whose compute actions an optional `observer` sees (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.observer: ActionObserver | None = None
        self.latest_forward: int | None = None  # micro-batch of the stage's latest forward

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.latest_forward = fwd_chunk_id
        with observed(self.observer, "F", self.stage_index, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        # "I": the weight gradients are left to a later backward_weight_one_chunk (zero-bubble schedules).
        with observed(self.observer, "B" if full_backward else "I", self.stage_index, bwd_chunk_id):
            return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                              last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with observed(self.observer, "W", self.stage_index, bwd_chunk_id):
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)


class StageLoss:
    """The schedule's loss function `fn(output, target, **loss_kwargs)`, observed by the last stage's observer."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], stages: Sequence[ObservedStage]):
        self.fn = fn
        self.stage = next((s for s in stages if s.is_last), None)  # only the last stage has a loss

    def __call__(self, output: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.stage is None:
            return self.fn(output, target, **kwargs)
        with observed(self.stage.observer, "loss", self.stage.stage_index, self.stage.latest_forward):
            return self.fn(output, target, **kwargs)

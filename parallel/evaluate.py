"""The validation loss of the model as it is, under any PP x EP x DP layout.

Forward only, under `torch.no_grad()`: no graph is kept, no gradient is touched, the optimizer
and the router biases are not called, and the stage modules' per-step statistics (max logits and
expert loads for QK-Clip and balancing) are left alone because the evaluator calls the model parts
(`K2Model`) directly, not the `StageModule`s the training schedule drives.

With pp > 1 the evaluator does not reuse the training schedule. torch 2.13's `_PipelineSchedule.eval`
runs the same schedule with backward switched off, which would go through the `StageModule`s (their
statistics, their saved-activation records, the training trace) and the schedule's receive buffers
and per-step state, all owned by the training step. Instead each micro-batch goes through the
virtual stages 0..S-1 in order: the rank holding stage s receives its input from the holder of
stage s-1 (`dist.recv`), runs the stage's forward, and sends the output on (`dist.send`). Every rank
walks the same (micro-batch, stage) order, and the EP ranks of a stage run its forward together,
so the expert all-to-all lines up. There is no overlap between stages; a validation pass is a
small part of a run and correctness across layouts comes first.

The loss is the mean of the micro-batch losses (each the mean token cross-entropy in float32,
`lm_loss`) over every micro-batch of every sequence rank, the same reduction as the training loss,
so one process and any layout give the same value for the same sequences.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.pipeline.stages import lm_loss


class Evaluator:
    """Validation passes over `batches` held-out global batches, the same sequences every time."""

    def __init__(self, runner, sampler, batches: int):
        self.runner, self.sampler, self.batches = runner, sampler, batches
        self.start = sampler.state_dict()
        state = runner.state
        self.num_stages = len(runner.split)
        self.pp = state.layout.pp
        self.parts = dict(zip(runner.stage_indices, runner.model.parts, strict=True))

    def _peer(self, stage: int) -> int:
        """The global rank of this rank's pipeline peer that holds virtual stage `stage`."""
        state = self.runner.state
        return state.layout.rank_of(dataclasses.replace(state.coords, pp=stage % self.pp))

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean validation loss; every rank must call it at the same point (it communicates)."""
        runner, state = self.runner, self.runner.state
        micro_batches, size = runner.micro_batches, runner.cfg.train.micro_batch_size
        self.sampler.load_state_dict(self.start)
        totals = torch.zeros(2, dtype=torch.float64, device=state.device)
        for _ in range(self.batches):
            inputs_BS, labels_BS = self.sampler.next_batch(
                micro_batches * size, rank=state.sequence_rank, world=state.layout.sequence_ranks)
            for x_BS, y_BS in zip(inputs_BS.chunk(micro_batches), labels_BS.chunk(micro_batches)):
                loss = self._forward(x_BS.to(state.device), y_BS.to(state.device))
                if loss is not None:
                    totals += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=state.device)])
        if state.is_distributed:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return (totals[0] / totals[1]).item()

    def _forward(self, x_BS: torch.Tensor, y_BS: torch.Tensor) -> torch.Tensor | None:
        """One micro-batch through every virtual stage; its loss on the last stage's ranks, else None."""
        hidden = None
        for stage in range(self.num_stages):
            part = self.parts.get(stage)
            if part is None:
                continue
            if stage == 0:
                hidden = x_BS
            elif hidden is None:  # the previous stage is on another pipeline rank
                hidden = torch.empty(*x_BS.shape, part.cfg.hidden_size, device=x_BS.device,
                                     dtype=next(part.parameters()).dtype)
                dist.recv(hidden, src=self._peer(stage - 1))
            hidden = part(hidden).output
            if stage == self.num_stages - 1:
                return lm_loss(hidden, y_BS)
            if (stage + 1) % self.pp != stage % self.pp:
                dist.send(hidden.contiguous(), dst=self._peer(stage + 1))
                hidden = None
        return None

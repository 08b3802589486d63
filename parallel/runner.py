"""One rank's share of a training step under any PP x EP x DP layout (one process is the 1x1x1 case).

The runner receives this rank's model parts with the parallelism applied (parallel/parallelize.py:
its virtual stages, its slice of the experts, the expert all-to-all, the pipeline schedule, the
sharded optimizer) and implements the step the training loop drives:
forward and backward over the rank's micro-batches, gradient reduction, the global statistics
(mean loss, per-head max logits, expert loads), clipping, MuonClip and the router-bias update.
Every rank computes the same global values, so every rank takes the same decisions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from k2train.config.schema import JobConfig
from k2train.data.sampler import SequenceSampler
from k2train.model.moe import update_router_bias_
from k2train.train.stats import StepResult
from parallel.checkpoint.checkpointer import CheckpointError, router_bias_key
from parallel.checkpoint.resume import resume_point
from parallel.signals import stop_on_signal
from parallel.pipeline.hooks import ActionObserver, observed
from parallel.pipeline.overlap import run_micro_batches
from parallel.pipeline.stages import lm_loss
from parallel.pipeline.torch_compat import ComputationType, schedule_stages
from parallel.parallelize import Parallelized
from parallel.state import ParallelState


class ParallelRunner:
    """Drives one rank's parts as `parallelize` left them (parallel/parallelize.py); `rank_runner`
    (parallel/startup.py) builds both."""

    def __init__(self, cfg: JobConfig, state: ParallelState, sampler: SequenceSampler, rank: Parallelized):
        self.cfg, self.state, self.sampler = cfg, state, sampler
        self.split, self.stage_indices, self.model = rank.split, rank.stage_indices, rank.model
        self.turns, self.micro_batches = rank.turns, rank.micro_batches
        self.offloader, self.saved, self.offload_keys = rank.offloader, rank.saved, rank.offload_keys
        self.stage_modules, self.trace, self.schedule = rank.stage_modules, rank.trace, rank.schedule
        self.optimizer = rank.optimizer
        self.tokens_per_step = cfg.train.global_batch_tokens
        self.start_step = 0
        self.checkpointer = None
        self.saved_step: int | None = None  # the step of this run's latest save
        self.stop_signals = None

    # -- the step --------------------------------------------------------------------------------

    def forward_backward(self) -> StepResult:
        """Run the rank's micro-batches, reduce gradients, and return the step's global statistics."""
        mbs = self.cfg.train.micro_batch_size
        self.sampler_before_step = self.sampler.state_dict()
        inputs_BS, labels_BS = self.sampler.next_batch(
            self.micro_batches * mbs, rank=self.state.sequence_rank, world=self.state.layout.sequence_ranks
        )
        inputs_BS, labels_BS = inputs_BS.to(self.state.device), labels_BS.to(self.state.device)
        if self.offloader is not None:
            self.offloader.expect(self.backward_order(), self.offload_keys)
        if self.schedule is None:
            loss_sum, max_logits_LH, counts_ME = self._run_local(inputs_BS, labels_BS)
        else:
            loss_sum, max_logits_LH, counts_ME = self._run_pipeline(inputs_BS, labels_BS)
        # The step's loss is the mean over every micro-batch of every sequence rank.
        with observed(self.step_observer, "reduce"):
            self.optimizer.reduce(divisor=self.micro_batches * self.state.layout.sequence_ranks)
        return self._global_stats(loss_sum, max_logits_LH, counts_ME)

    def _run_local(self, inputs_BS, labels_BS):
        """No pipeline: accumulate the micro-batches' gradients directly (one part holds every layer);
        with overlap, each backward runs beside the next forward (parallel/pipeline/overlap.py)."""
        model = self.model.parts[0]
        batches = list(zip(inputs_BS.chunk(self.micro_batches), labels_BS.chunk(self.micro_batches)))

        def forward(index: int):
            x_BS, y_BS = batches[index]
            with observed(self.step_observer, "F", 0, index):
                if self.saved is None:
                    out = model(x_BS)
                    output = out.output
                else:
                    with self.saved.record((0, index), tokens=x_BS.numel()):
                        out = model(x_BS)
                    output = self.saved.mark_backward_start(out.output, (0, index))
            # Only the statistics are kept, not the outputs: memory stays as without the table.
            return lm_loss(output, y_BS), out.max_logits_LH, out.expert_counts_ME, index

        def backward(result) -> None:
            with observed(self.step_observer, "B", 0, result[3]):
                result[0].backward()

        results = run_micro_batches(forward, backward, self.micro_batches, self.turns)
        loss_sum = torch.zeros((), device=self.state.device)
        max_logits, counts = None, None
        for loss, max_logits_LH, counts_ME, _ in results:
            loss_sum += loss.detach()
            max_logits = max_logits_LH if max_logits is None else torch.maximum(max_logits, max_logits_LH)
            counts = counts_ME if counts is None else counts + counts_ME
        return loss_sum, max_logits, counts

    def _run_pipeline(self, inputs_BS, labels_BS):
        for module in self.stage_modules:
            module.reset_stats()
        first, last = 0 in self.stage_indices, len(self.split) - 1 in self.stage_indices
        losses: list[torch.Tensor] = []
        args = (inputs_BS,) if first else ()
        with observed(self.step_observer, "schedule"):
            self.schedule.step(*args, target=labels_BS if last else None, losses=losses if last else None,
                               return_outputs=False)
            if self.turns is not None:  # the weight gradients the last backward held (overlap.py)
                self.turns.flush()
        loss_sum = torch.stack(losses).sum().detach() if last else torch.zeros((), device=self.state.device)
        max_logits = torch.cat([m.max_logits_LH for m in self.stage_modules])
        counts = torch.cat([m.counts_ME for m in self.stage_modules])
        return loss_sum, max_logits, counts

    # -- what observers and tests may read -------------------------------------------------------

    step_observer: ActionObserver | None = None  # set by observe_step

    @property
    def stages(self) -> list[PipelineStage]:
        """This rank's torch PipelineStage objects (parallel/pipeline/hooks.py ObservedStage), in
        stage order; none without a pipeline."""
        return [] if self.schedule is None else schedule_stages(self.schedule)

    @property
    def receive_log(self):
        """The pipeline receive buffers of this rank's stages (parallel/pipeline/buffers.py
        ReceiveBufferLog, one shared by the stages); None without a pipeline."""
        stages = self.stages
        return stages[0].log if stages else None

    def observe_step(self, observer: ActionObserver | None) -> None:
        """Enter `observer(kind, stage, microbatch)` around the parts of each step: every forward
        ("F") and backward ("B"; "I" and "W" when split) of a stage and micro-batch, the last
        stage's "loss" in a pipeline, the whole pipeline schedule ("schedule", None, None) and the
        gradient reduction ("reduce", None, None). Without a pipeline a backward includes its
        loss's. None stops observing."""
        self.step_observer = observer
        for stage in self.stages:
            stage.observer = observer

    def backward_order(self) -> list[tuple[int, int]]:
        """(stage, micro-batch) of this rank's backwards in the order its schedule runs them."""
        if self.schedule is None:
            return [(0, m) for m in range(self.micro_batches)]
        starts = (ComputationType.FULL_BACKWARD, ComputationType.BACKWARD_INPUT)
        actions = [sub for a in self.schedule.pipeline_order[self.state.coords.pp] if a is not None
                   for sub in a.sub_actions or (a,)]
        return [(a.stage_index, a.microbatch_index) for a in actions if a.computation_type in starts]

    @torch.no_grad()
    def _global_stats(self, loss_sum, local_max_logits_LH, local_counts_ME) -> StepResult:
        """Every rank's contribution, placed at its global layer rows, reduced over the world:
        MAX for the max logits, SUM for the loss and the expert loads."""
        model_cfg, device = self.cfg.model, self.state.device
        max_logits_LH = torch.full((model_cfg.num_layers, model_cfg.num_heads), float("-inf"), device=device)
        max_logits_LH[self.model.layer_ids()] = local_max_logits_LH.to(device)
        counts_ME = torch.zeros(model_cfg.num_moe_layers, model_cfg.num_experts, dtype=torch.float64, device=device)
        counts_ME[self.model.moe_rows()] = local_counts_ME.to(device=device, dtype=torch.float64)
        last = len(self.split) - 1 in self.stage_indices
        loss_terms = torch.tensor([loss_sum.item(), self.micro_batches if last else 0], dtype=torch.float64, device=device)
        sums = torch.cat([loss_terms, counts_ME.flatten()])
        if self.state.is_distributed:
            self.state.collectives.all_reduce(max_logits_LH, op=dist.ReduceOp.MAX)
            self.state.collectives.all_reduce(sums, op=dist.ReduceOp.SUM)
        loss = (sums[0] / sums[1]).item()
        counts_ME = sums[2:].view_as(counts_ME).round().to(torch.int64)
        return StepResult(loss, max_logits_LH.cpu(), counts_ME.cpu())

    def schedule_table(self) -> dict[int, list[str | None]] | None:
        """The pipeline schedule this rank's runtime executes: per pipeline rank, its actions in
        order ("0F1": stage 0 forward of micro-batch 1), None for an idle time step."""
        if self.schedule is None:
            return None
        return {
            rank: [None if action is None else str(action) for action in actions]
            for rank, actions in self.schedule.pipeline_order.items()
        }

    def clip_gradients(self, max_norm: float) -> float:
        return self.optimizer.clip_(max_norm)

    def optimizer_step(self, lr: float, max_logits_LH: torch.Tensor) -> None:
        """ZeRO-1 MuonClip: owners update and QK-Clip their master weights, then all-gather."""
        self.optimizer.step(lr, max_logits_LH.to(self.state.device), self.model.layer_ids())

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Logical key -> live view of everything this rank saves or restores (parallel/checkpoint/checkpointer.py)."""
        tensors = self.optimizer.checkpoint_tensors()
        for layer, bias in zip(self.model.moe_layer_ids(), self.model.router_biases(), strict=True):
            tensors[router_bias_key(layer)] = bias
        return tensors

    def attach_checkpointer(self, checkpointer, layout_header: dict, stop_signals=None) -> None:
        """Resume from the latest checkpoint under the checkpointer's root, if any, and save from now
        on; with `stop_signals` (parallel/signals.py), stop cleanly on SIGTERM / SIGINT."""
        self.checkpointer, self.layout_header, self.stop_signals = checkpointer, layout_header, stop_signals
        path = resume_point(checkpointer)
        if path is None:
            return
        step = checkpointer.verify(path)["step"]
        if self.cfg.train.steps <= step:
            raise CheckpointError(f"{path} is already at step {step}, and train.steps is {self.cfg.train.steps}; "
                                  "raise train.steps to train on, or use another checkpoint.dir to start over.")
        checkpointer.resume_lineage(path)
        restored, with_optimizer = checkpointer.load(path, self.checkpoint_tensors())
        self.optimizer.restore(restored.step if with_optimizer else 0, with_optimizer)
        if restored.sampler:
            self.sampler.load_state_dict(restored.sampler)
        self.start_step = restored.step
        if self.state.is_logging_rank:
            print(f"k2train: resumed from {path} at step {restored.step}")

    def save_last_good(self, step: int) -> None:
        """Checkpoint the state before the step that failed (parameters are not yet updated)."""
        if self.checkpointer is not None:
            self.checkpointer.save(step, self.checkpoint_tensors(), self.sampler_before_step, self.layout_header)
            self.checkpointer.wait()

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint the state after `step` (the training loop decides when)."""
        if self.checkpointer is not None:
            self.checkpointer.poll()  # an asynchronous save is published as soon as it is complete
            self.checkpointer.save(step, self.checkpoint_tensors(), self.sampler.state_dict(), self.layout_header)
            self.saved_step = step

    def end_of_step(self, step: int, last: bool) -> None:
        """Publish a complete asynchronous save (every save after the last step); stop on a signal."""
        if self.checkpointer is not None:
            if self.saved_step != step:
                self.checkpointer.poll()
            if last:
                self.checkpointer.wait()
        if self.stop_signals is not None:
            stop_on_signal(self, step, self.saved_step == step)

    def owned_gradients(self) -> dict[str, torch.Tensor]:
        """The reduced gradients this rank owns, by item key (valid between forward_backward and the step)."""
        return self.optimizer.owned_gradients()

    @torch.no_grad()
    def update_router_biases(self, counts_ME: torch.Tensor) -> None:
        """Move this rank's router biases by the step's global loads."""
        model_cfg = self.cfg.model
        for bias_E, row in zip(self.model.router_biases(), self.model.moe_rows(), strict=True):
            update_router_bias_(bias_E, counts_ME[row].to(bias_E.device), model_cfg.router_bias_update_rate)

    @torch.no_grad()
    def router_bias_means(self) -> list[float]:
        """Mean |bias| of every MoE layer of the model (each rank contributes its own layers)."""
        model_cfg = self.cfg.model
        means = torch.full((model_cfg.num_moe_layers,), float("-inf"), dtype=torch.float64, device=self.state.device)
        for bias_E, row in zip(self.model.router_biases(), self.model.moe_rows()):
            means[row] = bias_E.abs().mean().double()
        if self.state.is_distributed:
            self.state.collectives.all_reduce(means, op=dist.ReduceOp.MAX)  # replicas hold identical biases
        return means.tolist()


"""`k2train profile`: a config's training steps under its layout, timed and accounted.

Launched like `k2train train` (one process, or every rank of a torchrun / Slurm launch), it starts
the rank and builds the same `ParallelRunner` (parallel/startup.py) and drives it with the training
loop itself (`k2train/train/loop.py`), through a runner that times each step's phases (parallel/profiling/instrument.py):

1. `--warmup N` steps that are not timed (lazy initialisation, the schedule's first run); the last
   one counts the bytes every forward leaves saved for backward (parallel/profiling/memory.py);
2. `--steps M` measured steps: per rank, the time of every pipeline action, collective and
   optimizer phase (parallel/profiling/timing.py), the tokens read, and on CUDA the peak memory;
3. with a torch trace (the default), one more step under `torch.profiler`, kept out of the numbers
   because the profiler slows it down.
Rank 0 gathers every rank's results and writes `report.json`, `summary.txt` (which the command prints),
`timeline.png` and the spans it draws, `timeline.json` (parallel/profiling/report.py); each rank
writes its trace to `trace/rank<r>.json`.
No checkpoint is loaded or saved and no metrics run directory is made.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from k2train.config.checks import ConfigError
from k2train.config.schema import JobConfig
from k2train.train.loop import run_steps, open_sampler
from parallel.profiling.instrument import CountingSampler, instrumented
from parallel.profiling.memory import SavedCounter, check_fits, held_bytes
from parallel.profiling.report import build_report, write_report
from parallel.profiling.timing import COMPUTE_KINDS, Clock, Recorder, StepTiming, peak_saved_bytes
from parallel.runner import ParallelRunner
from parallel.startup import rank_runner, start_rank
from parallel.state import LaunchEnv, ParallelState
from parallel.trainer import shared_data_prefix


@dataclass(frozen=True)
class ProfileOptions:
    warmup: int = 2
    steps: int = 5
    out: str | None = None  # None: <logging.run_root>/profile-<config>-<date>-<time>
    peak_tflops: float | None = None  # per device; None: known devices only
    torch_trace: bool = True


def run_profile(cfg: JobConfig, options: ProfileOptions, env: LaunchEnv) -> dict | None:
    """Profile `cfg` as this process's rank of the launched world `env` (launch/env.py reads it);
    rank 0 returns the report, the others None."""
    if options.warmup < 1 or options.steps < 1:
        raise ConfigError(f"profile needs at least 1 warm-up and 1 measured step, got --warmup "
                          f"{options.warmup} and --steps {options.steps}.")
    state = start_rank(cfg, env, check=lambda layout, device: check_fits(cfg, layout, device))
    try:
        return _profile_rank(cfg, state, options)
    finally:
        if state.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def _profile_rank(cfg: JobConfig, state: ParallelState, options: ProfileOptions) -> dict | None:
    out_dir = _shared_out_dir(cfg, options, state)
    recorder = Recorder(Clock(state.device))
    runner = rank_runner(cfg, state, CountingSampler(open_sampler(cfg, shared_data_prefix(cfg, state)), recorder))
    steps = ProfiledSteps(runner, recorder, options, out_dir / "trace" / f"rank{state.rank}.json")
    total = options.warmup + options.steps + (1 if options.torch_trace else 0)
    with instrumented(runner, recorder, SavedCounter(runner, recorder)):
        run_steps(replace(cfg, train=replace(cfg.train, steps=total)), steps, None)
    mine = steps.rank_result(state, out_dir)
    everyone = [None] * state.layout.world_size
    if state.is_distributed:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if not state.is_logging_rank:
        return None
    report = build_report(cfg, state.layout, options, everyone, out_dir)
    write_report(report, everyone, out_dir)
    return report


def _shared_out_dir(cfg: JobConfig, options: ProfileOptions, state: ParallelState) -> Path:
    """--out, or a new directory named by rank 0's clock, the same on every rank."""
    if options.out:
        path = Path(options.out)
    else:
        stamp = [dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if state.is_distributed:
            dist.broadcast_object_list(stamp, src=0)
        path = Path(cfg.logging.run_root) / f"profile-{cfg.name}-{stamp[0]}"
    (path / "trace").mkdir(parents=True, exist_ok=True)
    return path


class ProfiledSteps:
    """The runner as the training loop drives it (loop.StepRunner), with each step timed.

    Step k is a warm-up step for k <= warmup (the last one counts saved activations), then a
    measured one, then the traced one. A step runs from `forward_backward` to the end of
    `end_of_step`, so it holds everything the loop does per step.
    """

    def __init__(self, runner: ParallelRunner, recorder: Recorder, options: ProfileOptions, trace_path: Path):
        self.runner, self.recorder, self.options = runner, recorder, options
        self.trace_path = trace_path
        self.step = 0
        self.measured: list[StepTiming] = []
        self.memory_step: StepTiming | None = None
        self.cuda_peak: int | None = None
        self._profiler = None

    def __getattr__(self, name):  # start_step, router_bias_means, save_last_good, ...
        return getattr(self.runner, name)

    def _phase(self) -> str:
        if self.step <= self.options.warmup:
            return "warmup"
        return "measured" if self.step <= self.options.warmup + self.options.steps else "trace"

    def forward_backward(self):
        self.step += 1
        phase, device = self._phase(), self.runner.state.device
        if phase == "measured" and not self.measured and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if phase == "trace":
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        self.recorder.count_saved = self.step == self.options.warmup
        self.recorder.begin_step(active=phase != "trace")
        return self.runner.forward_backward()

    def clip_gradients(self, max_norm: float) -> float:
        with self.recorder.span("optimizer"):
            return self.runner.clip_gradients(max_norm)

    def optimizer_step(self, lr: float, max_logits_LH: torch.Tensor) -> None:
        with self.recorder.span("optimizer"):
            self.runner.optimizer_step(lr, max_logits_LH)

    def update_router_biases(self, counts_ME: torch.Tensor) -> None:
        with self.recorder.span("optimizer"):
            self.runner.update_router_biases(counts_ME)

    def end_of_step(self, step: int, last: bool) -> None:
        self.runner.end_of_step(step, last)
        timing = self.recorder.end_step()
        phase = self._phase()
        if phase == "warmup" and self.step == self.options.warmup:
            self.memory_step = timing
        elif phase == "measured":
            self.measured.append(timing)
            if len(self.measured) == self.options.steps and self.runner.state.device.type == "cuda":
                self.cuda_peak = torch.cuda.max_memory_allocated(self.runner.state.device)
        elif phase == "trace":
            self._profiler.stop()
            self._profiler.export_chrome_trace(str(self.trace_path))

    def rank_result(self, state: ParallelState, out_dir: Path) -> dict:
        """What rank 0 needs from this rank (plain values, for all_gather_object)."""
        c, pp = state.coords, state.layout.pp
        last = sorted(self.measured[-1].spans, key=lambda s: s.start)
        memory = dict(held_bytes(self.runner), saved_activations=peak_saved_bytes(self.memory_step.spans))
        device = state.device
        return dict(
            rank=state.rank, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            coords=dict(pp=c.pp, ep=c.ep, dp=c.dp), stages=list(self.runner.stage_indices),
            # A pipeline's ranks all read their sequence rank's batch; each is credited its 1/pp share.
            steps=[dict(seconds=t.seconds, tokens=t.tokens_read // pp, breakdown=t.breakdown) for t in self.measured],
            timeline=[s.as_row() for s in last if s.kind in (*COMPUTE_KINDS, "comm", "optimizer")],
            timeline_seconds=self.measured[-1].seconds,
            memory=memory, cuda_peak_bytes=self.cuda_peak,
            trace=str(self.trace_path.relative_to(out_dir)) if self.options.torch_trace else None,
        )

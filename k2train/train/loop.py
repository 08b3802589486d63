"""The training loop: WSD learning rate, MuonClip steps, QK-Clip, router balancing, metrics.

One optimizer step (K2 §2, §3), whatever the layout:
1. the step runner runs the rank's micro-batches (gradients accumulate), reduces the gradients and
   returns the step's global statistics: mean loss, per-head max logits (a MAX over every
   micro-batch and rank) and expert loads (a SUM);
2. the global gradient norm is taken and clipped; a non-finite loss or norm stops the run before
   the update, on every rank at once since every rank sees the same values;
3. MuonClip steps with the WSD learning rate, then QK-Clip rescales the heads above τ;
4. the router biases move from the step's summed loads (aux-loss-free balancing).
The runner (parallel/runner.py) owns the model and everything distributed; this loop owns the
schedule, the decisions (when to checkpoint among them) and what the user sees. Only the logging rank writes files.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from k2train.config.load import config_to_dict, dump_config, save_config
from k2train.config.schema import JobConfig
from k2train.data.default_corpus import default_corpus_prefix
from k2train.data.mixture import build_samplers
from k2train.model import count_parameters
from k2train.optim.schedule import lr_at
from k2train.train.metrics import MetricsLog, read_metrics
from k2train.train.plots import write_plots
from k2train.train.stats import StepResult, step_record
from k2train.train.summary import format_nonfinite_stop, format_summary


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN or infinite; the message names the step."""


class StepRunner(Protocol):
    """One rank's share of a step (implemented by parallel.runner.ParallelRunner)."""

    def forward_backward(self) -> StepResult: ...

    def clip_gradients(self, max_norm: float) -> float: ...

    def optimizer_step(self, lr: float, max_logits_LH: torch.Tensor) -> None: ...

    def update_router_biases(self, counts_ME: torch.Tensor) -> None: ...

    def router_bias_means(self) -> list[float]: ...

    def save_last_good(self, step: int) -> None: ...  # checkpoint of the state before a failed step

    def save_checkpoint(self, step: int) -> None: ...  # checkpoint of the state after `step`

    start_step: int  # steps already taken (a resumed run starts after its checkpoint)

    sampler: object  # the training data's sampler (a mixture reports its realised shares)

    def end_of_step(self, step: int, last: bool) -> None: ...  # publishes finished saves, stops on a signal


class Evaluation(Protocol):
    """The validation loss of the model as it is (implemented by parallel.evaluate.Evaluator)."""

    def evaluate(self) -> float: ...


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None on ranks that do not log
    final_loss: float


def make_run_dir(cfg: JobConfig, resumed_from: int = 0) -> Path:
    """A new run directory; a resumed run whose named directory exists gets `<name>-from-step<N>`."""
    name = cfg.logging.run_name or f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.run_root) / name
    if resumed_from and (run_dir / "metrics.jsonl").exists():
        run_dir = run_dir.with_name(f"{name}-from-step{resumed_from}")
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another logging.run_name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def data_prefix(cfg: JobConfig) -> str:
    """The dataset prefix of the run: data.prefix, the embedded default corpus (prepared on first
    use), or "" for a mixture (which names its own prefixes)."""
    if cfg.data.mixture:
        return ""
    return cfg.data.prefix or default_corpus_prefix(cfg.data.tokenizer)


def open_samplers(cfg: JobConfig, prefix: str):
    """(training sampler, validation sampler or None); `prefix` is the single dataset's (`data_prefix`)."""
    return build_samplers(cfg.data, cfg.model.vocab_size, prefix)


def open_sampler(cfg: JobConfig, prefix: str):
    return open_samplers(cfg, prefix)[0]


def train(cfg: JobConfig, runner: StepRunner, layout: dict[str, int], logging_rank: bool,
          evaluation: Evaluation | None = None) -> RunResult:
    """Run `cfg` to the end with `runner`. `layout` (world_size, pp, vp, ep, dp) goes to the metrics.
    With `evaluation`, the validation loss is taken every train.eval_every steps and after the last.

    Raises NonFiniteLossError on a NaN/inf loss or gradient norm, after writing what was good.
    """
    if not logging_rank:
        return RunResult(None, run_steps(cfg, runner, None, evaluation))
    run_dir = make_run_dir(cfg, runner.start_step)
    print(f"k2train: run directory {run_dir}")
    print(dump_config(cfg), end="")
    save_config(cfg, run_dir / "config.yaml")
    total, active = count_parameters(cfg.model)
    header = dict(
        **layout, config=cfg.name, params_total=total, params_active=active,
        started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    with MetricsLog(
        run_dir, header, use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        config=config_to_dict(cfg), run_name=run_dir.name,
    ) as log:
        try:
            last = run_steps(cfg, runner, log, evaluation)
        except NonFiniteLossError:
            log.close(failed=True)
            _finish(cfg, run_dir)  # the plots and summary of the steps that were good
            raise
    _finish(cfg, run_dir)
    return RunResult(run_dir, last)


def run_steps(cfg: JobConfig, runner: StepRunner, log: MetricsLog | None, evaluation: Evaluation | None = None) -> float:
    tokens_per_step = cfg.train.global_batch_tokens
    bar = tqdm(
        total=cfg.train.steps, disable=log is None or not cfg.logging.progress_bar, unit="step",
        dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
    )
    started = time.perf_counter()
    last_good: dict | None = None
    loss = float("nan")
    tau = cfg.optimizer.qk_clip_tau if cfg.optimizer.qk_clip else None
    spikes = SpikeWatch(cfg.train.loss_spike_factor)
    skipped_in_row, skipped = 0, 0
    bar.update(runner.start_step)
    for step in range(runner.start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step - 1, cfg.optimizer)
        result = runner.forward_backward()
        loss = result.loss
        grad_norm = runner.clip_gradients(cfg.optimizer.max_grad_norm)
        finite = bool(torch.isfinite(torch.tensor([loss, grad_norm])).all())
        skipped_in_row = 0 if finite else skipped_in_row + 1
        skipped += not finite
        if not finite and (cfg.train.on_nonfinite == "stop" or skipped_in_row > cfg.train.max_skipped_steps):
            bar.close()
            if cfg.checkpoint.every_steps and step - 1 > runner.start_step:  # not the state it resumed from
                runner.save_last_good(step - 1)
            raise NonFiniteLossError(format_nonfinite_stop(step, last_good, skipped_in_row - 1, skipped - 1))
        if finite:
            runner.optimizer_step(lr, result.max_logits_LH)  # QK-Clip is part of the step (K2 Algorithm 1)
            runner.update_router_biases(result.counts_ME)
        elif log is not None:
            print(f"k2train: step {step}: loss {loss} / gradient norm {grad_norm} is not finite; "
                  "its update is skipped (train.on_nonfinite=skip)", file=sys.stderr, flush=True)
        spike = spikes.observe(loss) if finite else False
        if spike and log is not None:
            print(f"k2train: loss spike at step {step}: {loss:.4f} is over {cfg.train.loss_spike_factor}x the "
                  f"mean {spikes.last_mean:.4f} of the previous {len(spikes.window) - 1} steps", file=sys.stderr, flush=True)
        step_time = time.perf_counter() - t0
        clipped = (result.max_logits_LH > tau).sum(dim=1).tolist() if tau is not None else [0] * cfg.model.num_layers
        record = step_record(
            result, step=step, lr=lr, grad_norm=grad_norm, clipped=clipped, step_time=step_time,
            tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / step_time,
            router_bias_abs_mean=runner.router_bias_means(), elapsed=time.perf_counter() - started,
        )
        record.update(skipped=not finite, loss_spike=spike)
        record.update(_data_records(cfg, runner, evaluation, step))
        if finite:
            last_good = record
        if log is not None and (step % cfg.logging.log_every == 0 or step == cfg.train.steps or "val_loss" in record):
            log.log_step(record)
            if not cfg.logging.progress_bar:  # cluster logs: one line per logged step instead of a bar
                print(_step_line(record, cfg.train.steps), flush=True)
        if checkpoint_due(cfg, step):
            runner.save_checkpoint(step)
        runner.end_of_step(step, last=step == cfg.train.steps)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
    bar.close()
    if skipped and log is not None:
        print(f"k2train: {skipped} of {cfg.train.steps - runner.start_step} steps were skipped for a non-finite "
              "loss or gradient norm (train.on_nonfinite=skip)", flush=True)
    return loss


def checkpoint_due(cfg: JobConfig, step: int) -> bool:
    """Whether the state after `step` is saved: every checkpoint.every_steps steps and after the
    last (0: never). The loop alone decides; the runner's checkpointer only writes."""
    every = cfg.checkpoint.every_steps
    return bool(every) and (step % every == 0 or step == cfg.train.steps)


def _data_records(cfg: JobConfig, runner: StepRunner, evaluation: Evaluation | None, step: int) -> dict:
    """The realised mixture shares, and the validation loss on the steps that take one."""
    records = {}
    shares = getattr(runner.sampler, "shares", None)
    if shares is not None:
        records["data_share"] = shares()
    every = cfg.train.eval_every
    if evaluation is not None and every and (step % every == 0 or step == cfg.train.steps):
        records["val_loss"] = evaluation.evaluate()
    return records


class SpikeWatch:
    """Flags a loss above `factor` times the mean of the previous 10 finite losses (factor 0: off)."""

    def __init__(self, factor: float, window: int = 10):
        self.factor = factor
        self.window: deque[float] = deque(maxlen=window + 1)
        self.last_mean = float("nan")

    def observe(self, loss: float) -> bool:
        self.window.append(loss)
        previous = list(self.window)[:-1]
        if not self.factor or len(previous) < 3:
            return False
        self.last_mean = sum(previous) / len(previous)
        return loss > self.factor * self.last_mean


def _step_line(record: dict, steps: int) -> str:
    clipped = sum(record["qk_clipped_heads"])
    val = f"  val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
    return (
        f"step {record['step']}/{steps}  loss {record['loss']:.4f}{val}  lr {record['lr']:.3e}  "
        f"grad norm {record['grad_norm']:.3f}  max logit {max(record['max_logit_layer']):.2f}"
        f"{f'  qk-clipped {clipped}' if clipped else ''}  {record['tokens_per_s']:.0f} tokens/s"
    )


def _finish(cfg: JobConfig, run_dir: Path) -> None:
    header, steps = read_metrics(run_dir / "metrics.jsonl")
    tau = cfg.optimizer.qk_clip_tau if cfg.optimizer.qk_clip else None
    if cfg.logging.plots and steps:
        write_plots(run_dir, header, steps, tau=tau)
    print(format_summary(header, steps, run_dir, tau))
    print(f"k2train: run directory {run_dir}")

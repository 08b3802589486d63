"""The training loop on one process: global batch -> micro-batches, MuonClip, WSD, metrics.

One optimizer step (K2 §2, §3):
1. the global batch of `train.global_batch_tokens` tokens is split into micro-batches of
   `train.micro_batch_size` sequences, whose gradients accumulate in the parameters' grads;
2. the per-head max logits are kept as a running max over the micro-batches, and the expert
   loads are summed, so both describe the whole step;
3. MuonClip steps with the WSD learning rate, then QK-Clip rescales the heads above τ;
4. the router biases move from the step's summed loads (aux-loss-free balancing).
A non-finite loss or gradient norm stops the run before the update, naming the step.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from k2train.config.checks import micro_batches_per_step, validate_world
from k2train.config.load import config_to_dict, dump_config, save_config
from k2train.config.schema import JobConfig
from k2train.data.default_corpus import default_corpus_prefix
from k2train.data.indexed import IndexedDataset
from k2train.data.sampler import SequenceSampler
from k2train.model import K2Model, count_parameters
from k2train.optim.muon_clip import MuonClip
from k2train.optim.schedule import lr_at
from k2train.train.metrics import MetricsLog, read_metrics
from k2train.train.plots import write_plots
from k2train.train.stats import StepStats
from k2train.train.summary import format_nonfinite_stop, format_summary


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    final_loss: float


def check_supported(cfg: JobConfig) -> None:
    """Refuse, with one sentence each, the features this trainer does not run yet."""
    layout = (cfg.parallel.pp, cfg.parallel.vp, cfg.parallel.ep, cfg.parallel.dp or 1)
    if layout != (1, 1, 1, 1):
        raise NotImplementedError(
            f"parallel pp={cfg.parallel.pp} vp={cfg.parallel.vp} ep={cfg.parallel.ep} dp={cfg.parallel.dp}: "
            "this trainer runs one process (pp=vp=ep=dp=1); multi-process layouts are not implemented yet."
        )
    for key in ("fp8_activations", "selective_recompute", "activation_offload", "optimizer_offload"):
        if getattr(cfg.memory, key):
            raise NotImplementedError(f"memory.{key}=true is not implemented yet; set it to false.")
    if cfg.checkpoint.every_steps:
        raise NotImplementedError(
            f"checkpoint.every_steps={cfg.checkpoint.every_steps}: checkpointing is not implemented yet; set it to 0."
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda, but torch sees no CUDA device; use cpu or auto.")
    return torch.device(name)


def make_run_dir(cfg: JobConfig) -> Path:
    name = cfg.logging.run_name or f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.run_root) / name
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another logging.run_name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def open_sampler(cfg: JobConfig) -> SequenceSampler:
    prefix = cfg.data.prefix or default_corpus_prefix(cfg.data.tokenizer)
    dataset = IndexedDataset(prefix)
    dataset.check_vocab(cfg.model.vocab_size)
    return SequenceSampler(dataset, cfg.data.seq_len, cfg.data.seed)


def train(cfg: JobConfig) -> RunResult:
    """Run `cfg` to the end; returns the run directory. Raises NonFiniteLossError on NaN/inf."""
    check_supported(cfg)
    validate_world(cfg, 1, "the launched world of one process")
    device = resolve_device(cfg.parallel.device)
    sampler = open_sampler(cfg)  # bad data stops the run before it leaves a directory behind
    run_dir = make_run_dir(cfg)
    print(f"k2train: run directory {run_dir}")
    print(dump_config(cfg), end="")
    save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(cfg.train.seed)
    model = K2Model(cfg.model, seed=cfg.train.seed).to(device=device, dtype=getattr(torch, cfg.train.param_dtype))
    optimizer = MuonClip.from_config(model, cfg.optimizer)
    total, active = count_parameters(cfg.model)
    header = dict(
        world_size=1, pp=1, vp=1, ep=1, dp=1, config=cfg.name, params_total=total, params_active=active,
        started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    with MetricsLog(
        run_dir, header, use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        config=config_to_dict(cfg), run_name=run_dir.name,
    ) as log:
        try:
            last = _run_steps(cfg, model, optimizer, sampler, device, log)
        except NonFiniteLossError:
            log.close(failed=True)
            _finish(cfg, run_dir)  # the plots and summary of the steps that were good
            raise
    _finish(cfg, run_dir)
    return RunResult(run_dir, last)


def _run_steps(cfg, model, optimizer, sampler, device, log: MetricsLog) -> float:
    micro_batches = micro_batches_per_step(cfg, dp=1)
    tokens_per_step = micro_batches * cfg.train.micro_batch_size * cfg.data.seq_len
    bar = tqdm(
        total=cfg.train.steps, disable=not cfg.logging.progress_bar, unit="step", dynamic_ncols=True,
        file=sys.stderr, mininterval=0.5,
    )
    started = time.perf_counter()
    last_good: dict | None = None
    loss = float("nan")
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step - 1, cfg.optimizer)
        optimizer.set_lr(lr)
        stats = StepStats.empty(cfg.model, device)
        for _ in range(micro_batches):
            inputs_BS, labels_BS = (t.to(device) for t in sampler.next_batch(cfg.train.micro_batch_size))
            out = model(inputs_BS)
            micro_loss = F.cross_entropy(out.output.flatten(0, 1).float(), labels_BS.flatten())
            (micro_loss / micro_batches).backward()
            stats.add_micro_batch(micro_loss.detach(), out)
        loss = stats.mean_loss(micro_batches)
        grad_norm = _clip_grad_norm(model, cfg.optimizer.max_grad_norm)
        if cfg.train.stop_on_nonfinite and not (torch.isfinite(torch.tensor([loss, grad_norm])).all()):
            bar.close()
            raise NonFiniteLossError(format_nonfinite_stop(step, last_good))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clipped = optimizer.qk_clip_(stats.max_logits_LH)
        model.update_router_biases_(stats.counts_ME, cfg.model.router_bias_update_rate)
        step_time = time.perf_counter() - t0
        record = stats.record(
            step=step, loss=loss, lr=lr, grad_norm=grad_norm, clipped=clipped, step_time=step_time,
            tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / step_time,
            router_biases=model.router_biases(), elapsed=time.perf_counter() - started,
        )
        last_good = record
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
            log.log_step(record)
            if not cfg.logging.progress_bar:  # cluster logs: one line per logged step instead of a bar
                print(_step_line(record, cfg.train.steps), flush=True)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
    bar.close()
    return loss


def _step_line(record: dict, steps: int) -> str:
    clipped = sum(record["qk_clipped_heads"])
    return (
        f"step {record['step']}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
        f"grad norm {record['grad_norm']:.3f}  max logit {max(record['max_logit_layer']):.2f}"
        f"{f'  qk-clipped {clipped}' if clipped else ''}  {record['tokens_per_s']:.0f} tokens/s"
    )


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(params, limit).item()


def _finish(cfg: JobConfig, run_dir: Path) -> None:
    header, steps = read_metrics(run_dir / "metrics.jsonl")
    tau = cfg.optimizer.qk_clip_tau if cfg.optimizer.qk_clip else None
    if cfg.logging.plots and steps:
        write_plots(run_dir, header, steps, tau=tau)
    print(format_summary(header, steps, run_dir, tau))
    print(f"k2train: run directory {run_dir}")

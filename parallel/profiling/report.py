"""The profile's report: every rank's measurements combined into `report.json`, a one-screen
summary, and the executed pipeline timeline (parallel/profiling/timeline.py).

Throughput: a step takes as long as its slowest rank, so the step time is the max over ranks, and
tokens/s is the global batch over its mean. Each rank is credited its share of the tokens (a
pipeline's ranks share their sequence rank's batch), so the per-rank tokens add up to the batch.
Model FLOPs per token come from the config (k2train/train/flops.py); MFU is achieved model FLOP/s
over the world's peak, with a peak given by --peak-tflops or known for the GPU.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path

from k2train.config.checks import micro_batches_per_step
from k2train.config.schema import JobConfig
from k2train.train.flops import flops_per_token
from parallel.layout import Layout
from parallel.profiling.timeline import write_timeline
from parallel.profiling.timing import CATEGORIES

# Dense bf16 tensor-core peaks per GPU (vendor data sheets), matched on the device name; the
# more specific names first.
KNOWN_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H800 PCIe", 756.0), ("H100", 989.0),
                     ("H200", 989.0), ("H800", 989.0), ("A100", 312.0))
_SHORT = {"forward": "forward", "backward": "backward", "optimizer": "optimizer", "communication": "comm",
          "pipeline_idle": "pp-idle", "other": "other"}
# Above this many ranks the summary shows one line per pipeline rank (the mean of its ranks).
_MAX_RANK_LINES = 16


def peak_tflops(device_name: str, given: float | None) -> tuple[float | None, str]:
    """The peak dense TFLOP/s of one device and where it comes from."""
    if given is not None:
        return given, "--peak-tflops"
    for key, value in KNOWN_PEAK_TFLOPS:
        if key in device_name:
            return value, f"{key} bf16 dense peak"
    return None, f"no known peak for {device_name}: give --peak-tflops"


def build_report(cfg: JobConfig, layout: Layout, options, ranks: list[dict], out_dir: Path) -> dict:
    """The JSON report from every rank's `ProfiledSteps.rank_result`."""
    step_s = [max(r["steps"][i]["seconds"] for r in ranks) for i in range(options.steps)]
    mean_step = statistics.fmean(step_s)
    batch = cfg.train.global_batch_tokens
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_s = batch / mean_step
    device = ranks[0]["device"]
    peak, peak_source = peak_tflops(device, options.peak_tflops)
    achieved = flops.training * tokens_per_s
    return dict(
        kind="k2train-profile", config=cfg.name,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=device, backend="gloo" if device == "cpu" else "nccl",
        layout=dict(world_size=layout.world_size, pp=layout.pp, vp=layout.vp, ep=layout.ep, dp=layout.dp,
                    schedule=cfg.parallel.schedule, micro_batches=micro_batches_per_step(cfg, layout.dp),
                    micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len),
        steps=dict(warmup=options.warmup, measured=options.steps, torch_trace=options.torch_trace),
        tokens_per_step=batch,
        step_time_s=dict(mean=mean_step, min=min(step_s), max=max(step_s), per_step=step_s),
        tokens_per_s=dict(total=tokens_per_s, per_rank=[_rank_rate(r) for r in ranks]),
        flops=dict(
            per_token=flops.as_dict(), counting="matrix products only; attention causal (half the S^2 term); "
                                                "training = 3 x forward; recomputation not counted",
            achieved_per_s=achieved, achieved_per_s_per_device=achieved / layout.world_size,
            peak_tflops_per_device=peak, peak_source=peak_source,
            mfu=None if peak is None else achieved / (peak * 1e12 * layout.world_size),
        ),
        ranks=[_rank_entry(r) for r in ranks],
        memory=_memory(ranks),
        files=dict(report="report.json", summary="summary.txt", timeline="timeline.png", spans="timeline.json",
                   traces=[r["trace"] for r in ranks if r["trace"]]),
        out_dir=str(out_dir),
    )


def _rank_rate(rank: dict) -> float:
    return statistics.fmean(s["tokens"] for s in rank["steps"]) / statistics.fmean(s["seconds"] for s in rank["steps"])


def _rank_entry(rank: dict) -> dict:
    """A rank's mean step: seconds, tokens, and the seconds of each category."""
    steps = rank["steps"]
    return dict(
        rank=rank["rank"], **rank["coords"], stages=rank["stages"],
        step_s=statistics.fmean(s["seconds"] for s in steps),
        tokens_per_step=statistics.fmean(s["tokens"] for s in steps),
        tokens_per_s=_rank_rate(rank),
        time_s={c: statistics.fmean(s["breakdown"][c] for s in steps) for c in CATEGORIES},
    )


def _memory(ranks: list[dict]) -> dict:
    """Peak per pipeline rank: the largest of its ranks, measured on CUDA, accounted on CPU."""
    cuda = all(r["cuda_peak_bytes"] is not None for r in ranks)
    per_pp: dict[int, dict] = {}
    for r in ranks:
        parts = r["memory"]
        peak = r["cuda_peak_bytes"] if cuda else sum(parts.values())
        pp = r["coords"]["pp"]
        if pp not in per_pp or peak > per_pp[pp]["peak_bytes"]:
            per_pp[pp] = dict(pp_rank=pp, stages=r["stages"], rank=r["rank"], peak_bytes=peak,
                              accounted_bytes=sum(parts.values()), accounted=parts)
    source = ("torch.cuda.max_memory_allocated over the measured steps (accounted figures beside it)" if cuda else
              "accounted: parameters + gradient buffers + optimizer states + the most activation bytes saved "
              "for backward at once (saved-tensor hooks over one step)")
    return dict(source=source, per_pipeline_rank=[per_pp[pp] for pp in sorted(per_pp)])


def write_report(report: dict, ranks: list[dict], out_dir: Path) -> None:
    """report.json, summary.txt, timeline.png and timeline.json (the drawn spans) in `out_dir`."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    timeline = dict(columns=["kind", "stage", "microbatch", "start_s", "end_s", "collective"],
                    ranks=[dict(rank=r["rank"], **r["coords"], step_s=r["timeline_seconds"], spans=r["timeline"])
                           for r in ranks])
    (out_dir / "timeline.json").write_text(json.dumps(timeline) + "\n")
    (out_dir / "summary.txt").write_text(format_summary(report) + "\n")
    write_timeline(ranks, out_dir / "timeline.png", f"{report['config']}: last measured step")


def format_summary(report: dict) -> str:
    """The one-screen summary printed at the end of `k2train profile`."""
    lay, flops, steps = report["layout"], report["flops"], report["steps"]
    step = report["step_time_s"]
    world = lay["world_size"]
    mfu = (f"{flops['mfu']:.1%} of {flops['peak_tflops_per_device']:g} TFLOP/s per device ({flops['peak_source']})"
           if flops["mfu"] is not None else f"unknown ({flops['peak_source']})")
    lines = [
        f"k2train profile: {report['config']} on {_count(world, 'rank')} = pp {lay['pp']} x vp {lay['vp']} x ep {lay['ep']} "
        f"x dp {lay['dp']} ({lay['schedule']}), {report['device']} ({report['backend']})",
        f"  {_count(steps['warmup'], 'warm-up step')} + {steps['measured']} measured of {report['tokens_per_step']:,} tokens "
        f"({lay['micro_batches']} micro-batches of {lay['micro_batch_size']} x {lay['seq_len']} per sequence rank)",
        f"  step time    {step['mean']:.4g} s mean ({step['min']:.4g} - {step['max']:.4g}), the slowest rank's",
        f"  tokens/s     {report['tokens_per_s']['total']:,.0f} total, {report['tokens_per_s']['total'] / world:,.0f} per rank",
        f"  model FLOPs  {_si(flops['per_token']['training'])}FLOP per token (forward + backward), "
        f"{_si(flops['achieved_per_s'])}FLOP/s achieved",
        f"  MFU          {mfu}",
        "",
        "Time per step (ms)    " + "".join(f"{_SHORT[c]:>10}" for c in CATEGORIES) + f"{'step':>10}{'tokens/s':>11}",
    ]
    lines += [f"  {label:<20}" + "".join(f"{1e3 * entry['time_s'][c]:>10.2f}" for c in CATEGORIES)
              + f"{1e3 * entry['step_s']:>10.2f}{entry['tokens_per_s']:>11,.0f}" for label, entry in _rank_lines(report)]
    lines += ["", f"Peak memory per pipeline rank ({report['memory']['source']}):"]
    for entry in report["memory"]["per_pipeline_rank"]:
        parts = entry["accounted"]
        terms = (f"params {_bytes(parts['parameters'])} + gradients {_bytes(parts['gradient_buffers'])} + optimizer "
                 f"{_bytes(parts['optimizer_states'])} + saved activations {_bytes(parts['saved_activations'])}")
        accounted = (f"= {terms}" if entry["peak_bytes"] == entry["accounted_bytes"]
                     else f"(accounted {_bytes(entry['accounted_bytes'])} = {terms})")
        lines.append(f"  pp {entry['pp_rank']} (stages {', '.join(map(str, entry['stages']))}): "
                     f"{_bytes(entry['peak_bytes'])} on rank {entry['rank']} {accounted}")
    traces = f", trace/rank*.json ({len(report['files']['traces'])})" if report["files"]["traces"] else ""
    lines += ["", f"Files in {report['out_dir']}: report.json, summary.txt, timeline.png, timeline.json{traces}"]
    return "\n".join(lines)


def _rank_lines(report: dict) -> list[tuple[str, dict]]:
    """Every rank, or past _MAX_RANK_LINES ranks the mean of each pipeline rank's ranks."""
    ranks = report["ranks"]
    if len(ranks) <= _MAX_RANK_LINES:
        return [(f"rank {r['rank']} pp{r['pp']} ep{r['ep']} dp{r['dp']}", r) for r in ranks]
    lines = []
    for pp in sorted({r["pp"] for r in ranks}):
        group = [r for r in ranks if r["pp"] == pp]
        mean = dict(step_s=statistics.fmean(r["step_s"] for r in group),
                    tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in group),
                    time_s={c: statistics.fmean(r["time_s"][c] for r in group) for c in CATEGORIES})
        lines.append((f"pp {pp} ({len(group)} ranks)", mean))
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _si(value: float) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def _bytes(n: float) -> str:
    for factor, unit in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} B"

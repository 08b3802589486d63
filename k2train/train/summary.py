"""The one-screen end-of-run summary and the message of a run stopped on a non-finite loss.

The summary fits `MAX_LINES` × `MAX_COLUMNS` for any model size: per-layer values are listed
when they fit in two lines and condensed to min / median / max and the highest layers when
they do not (K2 has 61 layers). Plain ASCII, so it reads the same in Slurm logs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from k2train.train.metrics import moe_layer_ids

MAX_LINES = 25
MAX_COLUMNS = 100
_INDENT = "  "


def format_summary(
    header: dict[str, Any], steps: Sequence[dict[str, Any]], run_dir: str | Path, tau: float | None
) -> str:
    """The end-of-run summary: layout, size, throughput, loss, logits, clipping, load, files."""
    lines = [
        f"run {header['config']}: {len(steps)} steps logged, started {header['started_at']}",
        f"layout: world {header['world_size']} = pp {header['pp']} x ep {header['ep']} x "
        f"dp {header['dp']}, vp {header['vp']} virtual stages per pipeline rank",
        f"params: {_human(header['params_total'])} total, "
        f"{_human(header['params_active'])} active per token",
    ]
    if steps:
        lines += _progress_lines(steps) + _logit_lines(steps, tau) + _expert_lines(steps)
    else:
        lines.append("no optimizer step finished")
    lines += _file_lines(Path(run_dir))
    return "\n".join(_clip(line) for line in lines[:MAX_LINES])


def format_nonfinite_stop(step: int, last_good: dict[str, Any] | None, in_row: int = 0, skipped: int = 0) -> str:
    """The message for a run stopped because the loss of `step` is NaN or infinite (under "skip":
    after `in_row` skipped steps in a row, `skipped` in all)."""
    first = (
        f"Stopped at step {step}: the loss or gradient norm is not finite (NaN or inf); "
        "train.on_nonfinite is stop."
    )
    if in_row:
        first = (f"Stopped at step {step}: the loss or gradient norm is not finite (NaN or inf) for "
                 f"{in_row + 1} steps in a row, more than train.max_skipped_steps={in_row}; {skipped} steps were "
                 "skipped in all.")
    if last_good is None:
        return first + "\nNo earlier step had a finite loss."
    last = (
        f"Last good step {last_good['step']}: loss {_num(last_good['loss'], '.4f')}, "
        f"lr {_num(last_good['lr'], '.3e')}, grad norm {_num(last_good['grad_norm'], '.4g')}"
    )
    if last_good.get("max_logit_layer"):
        # Exploding attention logits are the instability QK-Clip targets (K2 §2).
        last += f", max logit {_num(_finite_max(last_good['max_logit_layer']), '.4g')}"
    return f"{first}\n{last}."


def _progress_lines(steps: Sequence[dict[str, Any]]) -> list[str]:
    """Steps, tokens, time, throughput, loss, lr."""
    last = steps[-1]
    losses = [(r["loss"], r["step"]) for r in steps if math.isfinite(r["loss"])]
    loss_line = f"loss: {_num(steps[0]['loss'], '.4f')} -> {_num(last['loss'], '.4f')}"
    if losses:
        low, low_step = min(losses)
        loss_line += f" (min {low:.4f} at step {low_step})"
    return [
        f"steps: {last['step']}, tokens: {_human(last['tokens'])}, {_wall_time(steps)}",
        f"throughput: {_throughput(steps)}",
        loss_line,
        *_data_lines(steps),
        f"lr: final {_num(last['lr'], '.3e')}; grad norm: final {_num(last['grad_norm'], '.4g')}",
    ]


def _data_lines(steps: Sequence[dict[str, Any]]) -> list[str]:
    """The validation loss (first -> last, best) and a mixture's realised shares, when the run has them."""
    lines = []
    evaluated = [(r["val_loss"], r["step"]) for r in steps if "val_loss" in r]
    if evaluated:
        (first, _), (final, final_step) = evaluated[0], evaluated[-1]
        finite = [pair for pair in evaluated if math.isfinite(pair[0])]
        best = f" (min {min(finite)[0]:.4f} at step {min(finite)[1]})" if finite else ""
        lines.append(f"validation loss: {_num(first, '.4f')} -> {_num(final, '.4f')} at step {final_step}{best}")
    shares = steps[-1].get("data_share")
    if shares:
        lines.append("data mixture drawn: " + ", ".join(f"{name} {share:.1%}" for name, share in shares.items()))
    return lines


def _wall_time(steps: Sequence[dict[str, Any]]) -> str:
    """Wall time from the optional `elapsed_s`, else the summed time of the logged steps."""
    if "elapsed_s" in steps[-1]:
        return f"wall time {_duration(steps[-1]['elapsed_s'])}"
    return f"time in logged steps {_duration(sum(r['step_time_s'] for r in steps))}"


def _throughput(steps: Sequence[dict[str, Any]]) -> str:
    """Mean tokens/s without the first step (it includes warm-up and compilation).

    The harmonic mean of per-step rates: with equal tokens per step it is total tokens over
    total time, which an arithmetic mean overstates when some steps are slow.
    """
    timed = steps[1:] if len(steps) > 1 else steps
    rates = [r["tokens_per_s"] for r in timed]
    rates = [rate for rate in rates if math.isfinite(rate) and rate > 0]
    if not rates:
        return "no timed steps"
    mean = len(rates) / sum(1.0 / rate for rate in rates)
    which = "after step 1" if len(steps) > 1 else "step 1 only, includes warm-up"
    median_time = statistics.median(r["step_time_s"] for r in timed)
    return f"{_human(mean)} tokens/s mean ({which}), median step time {_duration(median_time)}"


def _logit_lines(steps: Sequence[dict[str, Any]], tau: float | None) -> list[str]:
    """Max logit overall and per layer at the end, and the QK-Clip count (K2 §2)."""
    candidates = (
        (value, r["step"], layer)
        for r in steps
        for layer, value in enumerate(r["max_logit_layer"])
        if math.isfinite(value)
    )
    best = max(candidates, default=None)
    tau_text = f"; QK-Clip tau {tau:g}" if tau is not None else ""
    if best is None:
        return [f"max logit: none finite{tau_text}"]
    lines = [f"max logit: {best[0]:.1f} overall (step {best[1]}, layer {best[2]}){tau_text}"]
    final = steps[-1]["max_logit_layer"]
    lines += _per_layer("final max logit per layer", range(len(final)), final, lambda v: f"{v:.1f}")
    clipped = sum(sum(r["qk_clipped_heads"]) for r in steps)
    head_steps = sum(len(heads) for r in steps for heads in r["max_logit"])
    share = ""
    if head_steps:
        share = f" ({100.0 * clipped / head_steps:.2f}% of {head_steps} head-steps)"
    lines.append(f"qk-clip: {clipped} heads clipped in total{share}")
    return lines


def _expert_lines(steps: Sequence[dict[str, Any]]) -> list[str]:
    """Final load imbalance (max / mean load) per MoE layer; 1.0 is perfectly balanced."""
    final = steps[-1]
    if not final["expert_load_imbalance"]:
        return ["experts: no MoE layers"]
    return _per_layer(
        "final expert imbalance (max/mean load) per MoE layer",
        moe_layer_ids(final),
        final["expert_load_imbalance"],
        lambda v: f"{v:.3f}",
    )


def _per_layer(
    title: str, layer_ids: Sequence[int], values: Sequence[float], fmt: Callable[[float], str]
) -> list[str]:
    """A title line and the values as `L<i> <v>`, in two lines at most, else condensed."""
    items = [f"L{layer} {_num(value, fmt)}" for layer, value in zip(layer_ids, values)]
    wrapped = _wrap(items, MAX_COLUMNS - len(_INDENT))
    if len(wrapped) <= 2:
        return [f"{title}:"] + [_INDENT + line for line in wrapped]
    finite = [(v, layer) for layer, v in zip(layer_ids, values) if math.isfinite(v)]
    finite.sort(reverse=True)
    if not finite:
        return [f"{title}: none finite"]
    median = statistics.median(v for v, _ in finite)
    top = "  ".join(f"L{layer} {fmt(v)}" for v, layer in finite[:5])
    return [
        f"{title}: min {fmt(finite[-1][0])} (L{finite[-1][1]}), median {fmt(median)}, "
        f"max {fmt(finite[0][0])} (L{finite[0][1]})",
        f"{_INDENT}highest: {top}",
    ]


def _file_lines(run_dir: Path) -> list[str]:
    """The run directory, what it holds, and how to upload an offline wandb run."""
    lines = [f"run dir: {run_dir}"]
    if not run_dir.is_dir():
        return lines
    names = [p.name + ("/" if p.is_dir() else "") for p in sorted(run_dir.iterdir())]
    wrapped = _wrap_at_most(names, MAX_COLUMNS - len("files: "), max_lines=2) or ["(empty)"]
    lines += ["files: " + wrapped[0]] + [" " * len("files: ") + line for line in wrapped[1:]]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if offline:
        lines.append(f"wandb (offline): upload with `wandb sync {offline[-1]}`")
    return lines


def _wrap(items: Sequence[str], width: int, sep: str = "  ") -> list[str]:
    """Joins `items` with `sep` into lines of at most `width` characters (items are not split)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def _wrap_at_most(items: Sequence[str], width: int, max_lines: int) -> list[str]:
    """`_wrap` with ", " into `max_lines` lines; what does not fit becomes '... N more'."""
    shown = list(items)
    wrapped = _wrap(shown, width, sep=", ")
    while len(wrapped) > max_lines:
        shown.pop()
        wrapped = _wrap(shown + [f"... {len(items) - len(shown)} more"], width, sep=", ")
    return wrapped


def _clip(line: str) -> str:
    """A line cut to `MAX_COLUMNS`, keeping the end of long paths, which says the most."""
    if len(line) <= MAX_COLUMNS:
        return line
    return line[: MAX_COLUMNS // 3] + "..." + line[-(MAX_COLUMNS - MAX_COLUMNS // 3 - 3):]


def _num(value: float, fmt: str | Callable[[float], str]) -> str:
    """`value` formatted, or nan / inf / -inf as such."""
    if not math.isfinite(value):
        return str(value)
    return fmt(value) if callable(fmt) else format(value, fmt)


def _finite_max(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def _human(count: float) -> str:
    """1234 -> '1.23K', 1.04e12 -> '1.04T'; counts below 1000 as they are."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        # 0.9995: 999,999 shows as '1M', not '1e+03K'.
        if abs(count) >= 0.9995 * scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.4g}" if isinstance(count, float) else str(count)


def _duration(seconds: float) -> str:
    """Seconds as '0.213 s', '12.3 s', '5m 07s', '3h 04m' or '2d 03h'."""
    if not math.isfinite(seconds) or seconds < 59.95:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"

"""End-of-run plots of a run's metrics: loss and lr, max logits per layer, expert load.

Figures are built with `matplotlib.figure.Figure` and saved by its Agg canvas: no pyplot, no
screen, no global figure state, so plotting is safe inside a training process. Every figure
has a fixed pixel size (`FIG_SIZE_PX`) so files are predictable. Non-finite values are drawn
as gaps; the first step with a non-finite loss is marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from k2train.train.metrics import moe_layer_ids

DPI = 100
FIG_SIZE_PX = {"loss.png": (900, 500), "max_logit.png": (900, 500), "expert_load.png": (900, 800)}
# Above this many layers a legend is clutter; lines are coloured by layer with a colour bar.
_MAX_LEGEND_LAYERS = 10
# Markers make short runs (down to one step) visible; long runs read better as plain lines.
_MAX_MARKED_STEPS = 20


def write_plots(
    run_dir: str | Path,
    header: dict[str, Any],
    steps: Sequence[dict[str, Any]],
    tau: float | None = None,
) -> list[Path]:
    """Writes loss.png, max_logit.png and (for MoE models) expert_load.png into `run_dir`.

    `tau` is the QK-Clip threshold drawn on the max-logit plot (K2 §2: 100); None omits it.
    Returns the paths written; an empty list when there are no steps.
    """
    if not steps:
        return []
    run_dir = Path(run_dir)
    name = str(header.get("config", "run"))
    written = [
        _save(_loss_figure(name, steps), run_dir / "loss.png"),
        _save(_max_logit_figure(name, steps, tau), run_dir / "max_logit.png"),
    ]
    if steps[-1]["expert_load"]:
        written.append(_save(_expert_load_figure(name, steps), run_dir / "expert_load.png"))
    return written


def _loss_figure(name: str, steps: Sequence[dict[str, Any]]) -> Figure:
    """Loss over steps (left axis) with the learning rate on a twin axis (right)."""
    fig, ax = _figure("loss.png")
    x = [record["step"] for record in steps]
    marker = "o" if len(x) <= _MAX_MARKED_STEPS else None
    lines = ax.plot(x, _finite([r["loss"] for r in steps]), color="C0", marker=marker, label="loss")
    evaluated = [r for r in steps if "val_loss" in r]
    if evaluated:  # the held-out loss, on the steps that took one (train.eval_every)
        lines += ax.plot([r["step"] for r in evaluated], _finite([r["val_loss"] for r in evaluated]),
                         color="C2", marker="s", label="validation loss")
    _step_axis(ax, x)
    ax.set_ylabel("loss (cross-entropy)" if evaluated else "training loss (cross-entropy)")
    lr_ax = ax.twinx()
    lr = _finite([r["lr"] for r in steps])
    lines += lr_ax.plot(x, lr, color="C1", ls="--", marker=marker, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bad = next((r["step"] for r in steps if not math.isfinite(r["loss"])), None)
    if bad is not None:
        lines.append(ax.axvline(bad, color="red", ls=":", label=f"non-finite loss at step {bad}"))
    fig.legend(handles=lines, loc="outside lower center", ncols=len(lines), frameon=False)
    what = "training and validation loss" if evaluated else "training loss"
    ax.set_title(f"{name}: {what} and learning rate")
    return fig


def _max_logit_figure(name: str, steps: Sequence[dict[str, Any]], tau: float | None) -> Figure:
    """Per-layer max pre-softmax logit (max over heads) over steps, with the QK-Clip threshold."""
    fig, ax = _figure("max_logit.png")
    x = [record["step"] for record in steps]
    per_layer = np.array([_finite(r["max_logit_layer"]) for r in steps]).reshape(len(x), -1)
    _per_layer_lines(fig, ax, x, per_layer.T, list(range(per_layer.shape[1])))
    title = f"{name}: attention max logit per layer"
    # Drawn only when the logits come near it: a far-off line would flatten every curve.
    if tau is not None and np.nanmax(per_layer, initial=-np.inf) >= tau / 4:
        ax.axhline(tau, color="black", ls="--", lw=1.2, label=f"QK-Clip τ = {tau:g}")
    elif tau is not None:
        title += f" (QK-Clip τ = {tau:g}, far above)"
    _legend_right(fig, ax)
    _step_axis(ax, x)
    ax.set_ylabel("max pre-softmax logit (max over heads)")
    ax.set_title(title)
    return fig


def _expert_load_figure(name: str, steps: Sequence[dict[str, Any]]) -> Figure:
    """Top: final step's load per (MoE layer, expert); bottom: load imbalance over steps."""
    fig, (heat_ax, line_ax) = _figure("expert_load.png", rows=2, height_ratios=(3, 2))
    final = steps[-1]
    layer_ids = moe_layer_ids(final)
    load = np.array(_finite(final["expert_load"]), dtype=float).reshape(len(layer_ids), -1)
    uniform = 1.0 / load.shape[1]
    # White is the balanced load 1/E; red experts are over-loaded, blue ones under-loaded.
    peak = np.nanmax(load) if np.isfinite(load).any() else 0.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(peak, 2 * uniform))
    extent = (-0.5, load.shape[1] - 0.5, layer_ids[-1] + 0.5, layer_ids[0] - 0.5)
    image = heat_ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, extent=extent,
                           interpolation="nearest")
    fig.colorbar(image, ax=heat_ax, label=f"fraction of routed tokens (white = 1/{load.shape[1]})")
    heat_ax.set_xlabel("expert")
    heat_ax.set_ylabel("layer")
    heat_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat_ax.set_title(f"{name}: expert load at step {final['step']}")
    x = [record["step"] for record in steps]
    imbalance = np.array([_finite(r["expert_load_imbalance"]) for r in steps]).reshape(len(x), -1)
    _per_layer_lines(fig, line_ax, x, imbalance.T, layer_ids)
    line_ax.axhline(1.0, color="black", ls="--", lw=1.0)
    _legend_right(fig, line_ax)
    _step_axis(line_ax, x)
    line_ax.set_ylabel("max load / mean load (1 = balanced)")
    line_ax.set_title("load imbalance per MoE layer")
    return fig


def _per_layer_lines(
    fig: Figure, ax: Axes, x: Sequence[int], series: np.ndarray, layer_ids: Sequence[int]
) -> None:
    """One line per layer (`series`: layers × steps); many layers get a colour bar, not labels."""
    marker = "o" if len(x) <= _MAX_MARKED_STEPS else None
    few = len(layer_ids) <= _MAX_LEGEND_LAYERS
    norm = Normalize(vmin=layer_ids[0], vmax=max(layer_ids[-1], layer_ids[0] + 1))
    for layer, values in zip(layer_ids, series):
        if few:
            color, label = f"C{layer % 10}", f"layer {layer}"
        else:
            color, label = colormaps["viridis"](norm(layer)), "_nolegend_"
        ax.plot(x, values, color=color, marker=marker, lw=1.2, label=label)
    if not few:
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="layer")


def _step_axis(ax: Axes, x: Sequence[int]) -> None:
    """An x axis of whole optimizer steps; a one-step run gets a range around its step."""
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if min(x) == max(x):
        ax.set_xlim(x[0] - 1, x[0] + 1)


def _legend_right(fig: Figure, ax: Axes) -> None:
    """A legend of the labelled lines of `ax` at the figure's right edge, away from the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)


def _figure(file_name: str, rows: int = 1, height_ratios: tuple[int, ...] | None = None):
    """A figure of the fixed size for `file_name` with constrained layout, and its axes."""
    width, height = FIG_SIZE_PX[file_name]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    if rows == 1:
        return fig, fig.add_subplot()
    return fig, fig.subplots(rows, 1, height_ratios=height_ratios)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _finite(values: Any) -> Any:
    """The same nesting as `values` with every non-finite number replaced by NaN (a gap)."""
    if isinstance(values, (list, tuple)):
        return [_finite(value) for value in values]
    return values if math.isfinite(values) else math.nan

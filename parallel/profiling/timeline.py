"""The pipeline schedule as executed: one row per rank, time across, a box per stage forward (F),
backward (B; I and W when the backward is split) labelled "<stage><kind><micro-batch>" as in
`ParallelRunner.schedule_table`, the optimizer's phases in grey and collectives as a black strip
under the boxes. Blank row space is where the rank waited.

Each rank's times start at its own step start (its call of forward_backward). The previous step
ends with an all-reduce over the world, so the starts agree to within that collective's exit skew.
Built with `matplotlib.figure.Figure` on the Agg canvas, like k2train/train/plots.py.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DPI = 100
WIDTH_IN = 16
# Above this many ranks the figure shows the pipeline of rank 0 (its ep and dp coordinates).
MAX_ROWS = 16
# A box gets a label when it spans at least this fraction of the time axis.
_LABEL_MIN_FRACTION = 0.012
_KIND_MAPS = {"F": "Blues", "B": "Oranges", "I": "Oranges", "W": "Greens"}


def timeline_ranks(ranks: list[dict]) -> list[dict]:
    """The rows: every rank, or past MAX_ROWS the ranks of rank 0's pipeline, in rank order."""
    if len(ranks) <= MAX_ROWS:
        return ranks
    first = ranks[0]["coords"]
    return [r for r in ranks if (r["coords"]["ep"], r["coords"]["dp"]) == (first["ep"], first["dp"])]


def write_timeline(ranks: list[dict], path: Path, title: str) -> Path:
    """Draw each rank's `timeline` rows ([kind, stage, microbatch, start, end, name]) to `path`."""
    rows = timeline_ranks(ranks)
    num_stages = 1 + max((row[1] for r in rows for row in r["timeline"] if row[1] is not None), default=0)
    span = max(r["timeline_seconds"] for r in rows)
    fig = Figure(figsize=(WIDTH_IN, 1.4 + 0.55 * len(rows)), dpi=DPI)
    ax = fig.add_subplot()
    for y, rank in enumerate(rows):
        for kind, stage, microbatch, start, end, _ in rank["timeline"]:
            _draw(ax, y, kind, stage, microbatch, start * 1e3, (end - start) * 1e3, num_stages, span * 1e3)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, span * 1e3)
    ax.set_yticks(range(len(rows)), [_row_label(r) for r in rows])
    ax.set_xlabel("ms since the rank's step start")
    ax.set_title(title)
    kinds = {row[0] for r in rows for row in r["timeline"]}
    handles = [Patch(color=colormaps[_KIND_MAPS[k]](0.6), label=label) for k, label in
               (("F", "forward"), ("B", "backward"), ("I", "input backward"), ("W", "weight backward")) if k in kinds]
    handles += [Patch(color="0.75", label="optimizer"), Patch(color="black", label="collective")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / max(len(rows), 1) - 0.12),
              ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _draw(ax, y: int, kind: str, stage, microbatch, start_ms: float, width_ms: float,
          num_stages: int, span_ms: float) -> None:
    if kind == "comm":
        ax.broken_barh([(start_ms, width_ms)], (y + 0.28, 0.14), facecolors="black")
        return
    if kind == "optimizer":
        ax.broken_barh([(start_ms, width_ms)], (y - 0.4, 0.66), facecolors="0.75")
        return
    # Darker shades for later virtual stages of the same kind.
    shade = 0.35 + 0.5 * (stage / max(num_stages - 1, 1))
    ax.broken_barh([(start_ms, width_ms)], (y - 0.4, 0.66), facecolors=colormaps[_KIND_MAPS[kind]](shade),
                   edgecolors="white", linewidth=0.4)
    if width_ms >= _LABEL_MIN_FRACTION * span_ms:
        ax.text(start_ms + width_ms / 2, y - 0.07, f"{stage}{kind}{microbatch}", ha="center", va="center",
                fontsize=6, color="black" if shade < 0.6 else "white")


def _row_label(rank: dict) -> str:
    c = rank["coords"]
    return f"rank {rank['rank']} (pp{c['pp']} ep{c['ep']} dp{c['dp']})"

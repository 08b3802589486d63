"""Timed spans of one rank's training step, and the step's time split into where it went.

A `Recorder` notes spans (a pipeline action, a collective, the optimizer, ...) on a `Clock`: on CPU
`time.perf_counter`, on CUDA events recorded on the current stream and read once the step has
synchronised, so a span measures when the device got to its start and end, not when the host
queued them. Spans are kept relative to the step's start.

`time_breakdown` splits the step into categories, every instant counted once, by the innermost
kind of span covering it (collectives sit inside forwards, backwards or the optimizer):
- communication: inside a collective (EP all-to-all, ZeRO-1 reduce-scatter and all-gather, the
  statistics all-reduces), including the wait for the slowest peer of that collective;
- forward / backward: a pipeline stage's forward (with the loss on the last stage), its backward
  (input and weight parts of a split backward both count as backward);
- optimizer: gradient reduction bookkeeping, clipping, the MuonClip update and router-bias update;
- pipeline_idle: inside the pipeline schedule but in none of the above: waiting for a neighbour
  stage's activations or gradients (the bubble) and the point-to-point transfers themselves;
- other: the rest of the step (reading the batch, the step's statistics, the loop's bookkeeping;
  without a pipeline also the loss's forward: its backward is part of the micro-batch's backward).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

CATEGORIES = ("forward", "backward", "optimizer", "communication", "pipeline_idle", "other")
# Span kinds, innermost first, and the category each one's time goes to.
_PRECEDENCE = ("comm", "F", "B", "I", "W", "optimizer", "schedule")
_CATEGORY = {"comm": "communication", "F": "forward", "B": "backward", "I": "backward", "W": "backward",
             "optimizer": "optimizer", "schedule": "pipeline_idle"}
COMPUTE_KINDS = ("F", "B", "I", "W")  # pipeline actions: forward, full backward, input / weight backward


class Clock:
    """Timestamps on the host (CPU) or on the device's current stream (CUDA events)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, origin, marks: list) -> list[float]:
        """Each mark's time after `origin`, in seconds (waits for the device on CUDA)."""
        if not self.cuda:
            return [mark - origin for mark in marks]
        torch.cuda.synchronize()
        return [origin.elapsed_time(mark) / 1e3 for mark in marks]


@dataclass
class Span:
    kind: str  # "F", "B", "I", "W", "comm", "optimizer", "schedule"
    start: float  # seconds after the step's start (a clock mark until the step is resolved)
    end: float | None = None  # None while open
    stage: int | None = None  # virtual stage of a pipeline action
    microbatch: int | None = None
    name: str = ""  # the collective's name
    saved_bytes: int = 0  # forwards: bytes left saved for backward (when counted)

    def as_row(self) -> list:
        return [self.kind, self.stage, self.microbatch, round(self.start, 7), round(self.end, 7), self.name]


@dataclass
class StepTiming:
    """One step of one rank: its length, its spans and the tokens the rank read."""

    seconds: float
    spans: list[Span]
    tokens_read: int
    breakdown: dict[str, float] = field(default_factory=dict)


class Recorder:
    """Collects the spans of the current step while `active`."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.active = False
        self.count_saved = False  # forwards also count the bytes they leave saved (memory step)
        self.spans: list[Span] = []
        self.tokens_read = 0
        self.forwards = 0  # forwards so far in this step (micro-batch index without a pipeline)
        self._origin = None

    def begin_step(self, active: bool = True) -> None:
        self.spans, self.tokens_read, self.forwards = [], 0, 0
        self.active = active
        self._origin = self.clock.now()

    def end_step(self) -> StepTiming:
        end = self.clock.now()
        spans = [s for s in self.spans if s.end is not None]  # a span still open did not finish
        marks = [m for s in spans for m in (s.start, s.end)]
        times = self.clock.seconds(self._origin, marks + [end])
        for i, span in enumerate(spans):
            span.start, span.end = times[2 * i], times[2 * i + 1]
        timing = StepTiming(times[-1], spans, self.tokens_read)
        timing.breakdown = time_breakdown(spans, timing.seconds)
        self.active = False
        return timing

    def open(self, kind: str, stage: int | None = None, microbatch: int | None = None, name: str = "") -> Span | None:
        if not self.active:
            return None
        span = Span(kind, self.clock.now(), stage=stage, microbatch=microbatch, name=name)
        self.spans.append(span)
        return span

    def close(self, span: Span | None) -> None:
        if span is not None:
            span.end = self.clock.now()

    @contextmanager
    def span(self, kind: str, stage: int | None = None, microbatch: int | None = None,
             name: str = "") -> Iterator[Span | None]:
        span = self.open(kind, stage, microbatch, name)
        try:
            yield span
        finally:
            self.close(span)


def time_breakdown(spans: list[Span], seconds: float) -> dict[str, float]:
    """Seconds of the step per category (CATEGORIES); they add up to `seconds`.

    Every instant goes to the innermost kind of span covering it (_PRECEDENCE), or to "other".
    """
    events = []
    for span in spans:
        start, end = max(span.start, 0.0), min(span.end, seconds)
        if end > start:
            events += [(start, 1, span.kind), (end, -1, span.kind)]
    events.sort(key=lambda e: (e[0], e[1]))
    totals = dict.fromkeys(CATEGORIES, 0.0)
    active = dict.fromkeys(_PRECEDENCE, 0)
    now = 0.0
    for when, delta, kind in events + [(seconds, 0, None)]:
        if when > now:
            innermost = next((k for k in _PRECEDENCE if active[k] > 0), None)
            totals[_CATEGORY.get(innermost, "other")] += when - now
            now = when
        if kind is not None:
            active[kind] += delta
    return totals


def peak_saved_bytes(spans: list[Span]) -> int:
    """The most bytes held for backward at once: a forward's saved bytes live from its end until
    the end of the last backward part (B, or W after I) of the same (stage, micro-batch)."""
    freed_at: dict[tuple, float] = {}
    for span in spans:
        if span.kind in ("B", "I", "W"):
            key = (span.stage, span.microbatch)
            freed_at[key] = max(freed_at.get(key, span.end), span.end)
    changes = []
    for span in spans:
        if span.kind == "F" and span.saved_bytes:
            changes.append((span.end, span.saved_bytes))
            changes.append((freed_at.get((span.stage, span.microbatch), float("inf")), -span.saved_bytes))
    live = peak = 0
    for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):
        live += delta
        peak = max(peak, live)
    return peak

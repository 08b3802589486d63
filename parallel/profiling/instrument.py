"""Where a profiled step is timed: observers installed on the runner's named hooks for the profile
and removed after it, so the step runs the training code unchanged (parallel/runner.py).

- collectives: the rank's `ParallelState.collectives` (parallel/collectives.py), through which the
  expert all-to-all, ZeRO-1's reduce-scatter and all-gather and the step's statistics all-reduces
  are called, each timed while it runs synchronously (point-to-point pipeline transfers are left
  out on purpose: waiting on them is the pipeline's idle time);
- the step (`runner.observe_step`): with a pipeline, each action of the rank's stages (torch's
  `forward_one_chunk` / `backward_one_chunk` / `backward_weight_one_chunk`, carrying the
  micro-batch index; parallel/pipeline/hooks.py), the last stage's loss added to its forward, and
  the schedule's whole step, which bounds the time in which the pipeline can idle; without one,
  each micro-batch's forward and its backward; in both, the optimizer's gradient reduction;
- the tokens the rank reads: `CountingSampler`, the sampler the profiled runner is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from parallel.profiling.memory import SavedCounter
from parallel.profiling.timing import Recorder


class CountingSampler:
    """A sampler (k2train/data/sampler.py) that adds the tokens of every batch it reads to
    `recorder.tokens_read`; everything else is the sampler's own."""

    def __init__(self, sampler, recorder: Recorder):
        self.sampler, self.recorder = sampler, recorder

    def next_batch(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.sampler.next_batch(*args, **kwargs)
        self.recorder.tokens_read += inputs.numel()
        return inputs, labels

    def __getattr__(self, name):  # state_dict, load_state_dict, shares, ...
        return getattr(self.sampler, name)


@contextmanager
def instrumented(runner, recorder: Recorder, counter: SavedCounter) -> Iterator[None]:
    """Time `runner`'s steps into `recorder` while the context is open."""
    runner.observe_step(_StepObserver(recorder, counter))
    try:
        with runner.state.collectives.observed(lambda name, nbytes: recorder.span("comm", name=name)):
            yield
    finally:
        runner.observe_step(None)


class _StepObserver:
    """The runner's step observer: a span per forward (counting the bytes it leaves saved for
    backward), backward, schedule step and gradient reduction; the loss extends its forward."""

    def __init__(self, recorder: Recorder, counter: SavedCounter):
        self.recorder, self.counter = recorder, counter

    @contextmanager
    def __call__(self, kind: str, stage: int | None, microbatch: int | None) -> Iterator[None]:
        recorder = self.recorder
        if kind == "F":
            with recorder.span("F", stage, microbatch) as span, self.counter.counting(span):
                yield
        elif kind == "loss":
            yield
            self._extend_forward(stage, microbatch)
        else:
            with recorder.span("optimizer" if kind == "reduce" else kind, stage, microbatch):
                yield

    def _extend_forward(self, stage: int, microbatch: int | None) -> None:
        """torch computes the last stage's loss right after its forward: the forward's span takes it in."""
        recorder = self.recorder
        if not recorder.active:
            return
        for span in reversed(recorder.spans):
            if span.kind == "F" and (span.stage, span.microbatch) == (stage, microbatch):
                span.end = recorder.clock.now()
                break

"""Where a profiled step is timed: wrappers put around a runner's parts for the profile and taken
off after it, so the step runs the training code unchanged (parallel/runner.py).

- collectives: the `torch.distributed` functions the runner calls (and ZeRO-1's reduce-scatter,
  bound when parallel/zero1/optimizer.py is imported), timed while they run synchronously;
- pipeline: each of torch's PipelineStage objects of the rank (`schedule._stages`), whose
  `forward_one_chunk` / `backward_one_chunk` / `backward_weight_one_chunk` are one schedule action
  each and carry the micro-batch index; the last stage's loss is added to its forward; the
  schedule's `step` bounds the time in which the pipeline can idle;
- without a pipeline: the model part's forward, and its backward from the moment the gradient
  reaches the model's output until autograd finishes (a callback queued on the engine);
- the optimizer's gradient reduction, and the sampler (the tokens the rank reads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from parallel.zero1 import optimizer as zero1
from parallel.profiling.memory import SavedCounter
from parallel.profiling.timing import Recorder

# The collectives the runner, the expert exchange and ZeRO-1 issue (point-to-point pipeline
# transfers are left out on purpose: waiting on them is the pipeline's idle time).
COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_gather", "broadcast", "barrier")


class Patches:
    """Attributes replaced by wrappers, put back by `undo` (in reverse order)."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object, bool]] = []

    def wrap(self, owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        own = name in vars(owner)  # an instance or module attribute, not a class method
        setattr(owner, name, make(original))
        self._undo.append((owner, name, original, own))

    def undo(self) -> None:
        while self._undo:
            owner, name, original, own = self._undo.pop()
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


@contextmanager
def instrumented(runner, recorder: Recorder, counter: SavedCounter) -> Iterator[None]:
    """Time `runner`'s steps into `recorder` while the context is open."""
    patches = Patches()
    try:
        for name in COLLECTIVES:
            if hasattr(dist, name):
                patches.wrap(dist, name, _collective(recorder, name))
        patches.wrap(zero1, "_reduce_scatter", _collective(recorder, "reduce_scatter"))
        patches.wrap(runner.optimizer, "reduce", lambda f: _spanned(recorder, "optimizer", f))
        patches.wrap(runner.sampler, "next_batch", lambda f: _counting_tokens(recorder, f))
        if runner.schedule is None:
            _instrument_local(patches, runner.model.parts[0], recorder, counter)
        else:
            _instrument_pipeline(patches, runner.schedule, recorder, counter)
        yield
    finally:
        patches.undo()


def _collective(recorder: Recorder, name: str):
    def make(original):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            if kwargs.get("async_op"):  # returns at once; its wait is not a call we see
                return original(*args, **kwargs)
            with recorder.span("comm", name=name):
                return original(*args, **kwargs)
        return timed
    return make


def _spanned(recorder: Recorder, kind: str, original):
    @functools.wraps(original)
    def timed(*args, **kwargs):
        with recorder.span(kind):
            return original(*args, **kwargs)
    return timed


def _counting_tokens(recorder: Recorder, original):
    @functools.wraps(original)
    def read(*args, **kwargs):
        inputs, labels = original(*args, **kwargs)
        recorder.tokens_read += inputs.numel()
        return inputs, labels
    return read


def _instrument_pipeline(patches: Patches, schedule, recorder: Recorder, counter: SavedCounter) -> None:
    patches.wrap(schedule, "step", lambda f: _spanned(recorder, "schedule", f))
    for stage in schedule._stages:  # torch's PipelineStage objects of this rank
        index = stage.stage_index
        patches.wrap(stage, "forward_one_chunk", lambda f, s=index: _stage_forward(recorder, counter, s, f))
        patches.wrap(stage, "backward_one_chunk", lambda f, s=index: _stage_backward(recorder, s, f))
        patches.wrap(stage, "backward_weight_one_chunk", lambda f, s=index: _stage_weight_backward(recorder, s, f))
    patches.wrap(schedule, "_maybe_compute_loss", lambda f: _loss_in_forward(recorder, f))


def _stage_forward(recorder: Recorder, counter: SavedCounter, stage: int, original):
    @functools.wraps(original)
    def forward(fwd_chunk_id, *args, **kwargs):
        with recorder.span("F", stage, fwd_chunk_id) as span, counter.counting(span):
            return original(fwd_chunk_id, *args, **kwargs)
    return forward


def _stage_backward(recorder: Recorder, stage: int, original):
    @functools.wraps(original)
    def backward(bwd_chunk_id, *args, **kwargs):
        # (bwd_chunk_id, loss=None, full_backward=True, last_backward=False): "I" when the weight
        # gradients are left to a later backward_weight_one_chunk (zero-bubble schedules).
        full = kwargs["full_backward"] if "full_backward" in kwargs else (args[1] if len(args) > 1 else True)
        with recorder.span("B" if full else "I", stage, bwd_chunk_id):
            return original(bwd_chunk_id, *args, **kwargs)
    return backward


def _stage_weight_backward(recorder: Recorder, stage: int, original):
    @functools.wraps(original)
    def backward(bwd_chunk_id, *args, **kwargs):
        with recorder.span("W", stage, bwd_chunk_id):
            return original(bwd_chunk_id, *args, **kwargs)
    return backward


def _loss_in_forward(recorder: Recorder, original):
    """The last stage's loss extends its forward's span (torch computes it right after)."""
    @functools.wraps(original)
    def compute(stage, output, target_mbs, mb_index, *args, **kwargs):
        result = original(stage, output, target_mbs, mb_index, *args, **kwargs)
        if recorder.active and stage.is_last:
            for span in reversed(recorder.spans):
                if span.kind == "F" and (span.stage, span.microbatch) == (stage.stage_index, mb_index):
                    span.end = recorder.clock.now()
                    break
        return result
    return compute


def _instrument_local(patches: Patches, part: torch.nn.Module, recorder: Recorder, counter: SavedCounter) -> None:
    """No pipeline: micro-batches run one after the other, forward then backward."""

    def make(original):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            microbatch = recorder.forwards
            recorder.forwards += 1
            with recorder.span("F", 0, microbatch) as span, counter.counting(span):
                out = original(*args, **kwargs)
            if span is not None and out.output.requires_grad:
                out.output.register_hook(_backward_marks(recorder, microbatch))
            return out
        return forward

    patches.wrap(part, "forward", make)


def _backward_marks(recorder: Recorder, microbatch: int):
    """A tensor hook on the model's output: the backward starts when its gradient arrives and ends
    when autograd has run the whole graph (the engine's callback)."""
    def hook(grad):
        span = recorder.open("B", 0, microbatch)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: recorder.close(span))
    return hook

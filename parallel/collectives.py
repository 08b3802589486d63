"""The collectives the training step issues, called through one object so that they can be observed.

The runtime (the expert all-to-all, ZeRO-1's reduce-scatter and all-gather, the step's statistics
all-reduces) calls `torch.distributed` through the `Collectives` of its `ParallelState`, with the
same arguments. An observer, when one is set (`observed`), is entered around each synchronous call
as `observer(name, nbytes)` (the torch function's name and the bytes of this rank's input) and
exited when the call returns: the profiler (parallel/profiling/instrument.py) times the step's
communication this way. Without an observer a call costs one method call more than torch's own.
Asynchronous calls (`async_op=True`) are not observed: they return at once and their wait is
elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist

# observer(name, nbytes) -> a context entered around the call.
CollectiveObserver = Callable[[str, int], AbstractContextManager]

# torch 2.13 renamed reduce_scatter_tensor (older releases, e.g. the GPU images', have only that name).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Collectives:
    """`torch.distributed`'s collectives as the runtime uses them, with an optional observer."""

    def __init__(self) -> None:
        self.observer: CollectiveObserver | None = None

    @contextmanager
    def observed(self, observer: CollectiveObserver) -> Iterator[None]:
        """Enter `observer` around every synchronous collective while the context is open."""
        previous, self.observer = self.observer, observer
        try:
            yield
        finally:
            self.observer = previous

    def _call(self, name: str, fn: Callable, nbytes: int, *args, **kwargs):
        if self.observer is None or kwargs.get("async_op"):
            return fn(*args, **kwargs)
        with self.observer(name, nbytes):
            return fn(*args, **kwargs)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None,
                          input_split_sizes: list[int] | None, group=None, async_op: bool = False):
        return self._call("all_to_all_single", dist.all_to_all_single, input.nbytes, output, input,
                          output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM, group=None):
        return self._call("reduce_scatter", _REDUCE_SCATTER, input.nbytes, output, input, op=op, group=group)

    def all_gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor, group=None):
        return self._call("all_gather_into_tensor", dist.all_gather_into_tensor, input.nbytes, output, input,
                          group=group)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None):
        return self._call("all_reduce", dist.all_reduce, tensor.nbytes, tensor, op=op, group=group)

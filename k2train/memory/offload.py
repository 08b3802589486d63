"""Activation CPU offload in pipeline-schedule order (K2 §2.4.3).

K2 keeps almost no activations on the GPU: what remains after recomputation and FP8 storage goes to
host RAM on a copy engine, overlapped with compute; in the 1F1B phase the previous micro-batch's
forward activations are offloaded while the next backward's are prefetched. Here:

- `pack` (called by `SavedActivations`' saved-tensor hook during a forward) copies the tensor into
  host memory — pinned, on a side CUDA stream that first waits for the compute stream, with
  `record_stream` so the device memory is reused only after the copy — and returns a handle; the
  device tensor itself is released as soon as autograd no longer needs it (the handle replaces it
  in the graph). On CPU the same path copies into a separate host allocation, synchronously.
- `backward_begins(key)` runs (from the stage output's autograd node) when the backward of a
  micro-batch starts: its tensors are fetched if a prefetch did not already do it, and the tensors
  of the *next* backward in this rank's schedule order are prefetched on the side stream.
- `unpack` makes the compute stream wait for the handle's copy and returns the device tensor.
Copies are exact, so gradients equal those without offload bit for bit.

The order of backwards is given per step by the runner (`expect(order)`): for a pipeline rank it is
the backward order of its schedule table; without a pipeline, micro-batch by micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Offloaded:
    """A saved tensor's host copy and, once fetched, its device copy and the copy's event."""

    __slots__ = ("host", "device_copy", "ready")

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class ActivationOffloader:
    """Host copies of a rank's saved activations, grouped by micro-batch key, prefetched in order."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pending: dict[object, list[_Offloaded]] = {}  # forward done, backward not begun
        self._order: list[object] = []
        self.offloaded: set | None = None
        self.host_bytes = 0  # bytes copied to host this step
        self.host_bytes_by_key: dict[object, int] = {}  # of them, per micro-batch key
        # What a step did, for reports and tests: groups in the order their fetch was issued, and
        # tensors whose backward needed them before any fetch (0 when the schedule order holds).
        self.fetched_groups: list[object] = []
        self.late_fetches = 0

    def expect(self, order: Sequence[object], offloaded: set | None = None) -> None:
        """The keys of this step's micro-batch backwards, in the order they will run, and the keys
        whose tensors go to host (None: all; parallel/plan/offload.py chooses under a budget)."""
        self._order = list(order)
        self.offloaded = offloaded
        self._pending.clear()
        self.host_bytes = 0
        self.host_bytes_by_key = {}
        self.fetched_groups.clear()
        self.late_fetches = 0

    def takes(self, key: object) -> bool:
        """Whether micro-batch `key`'s saved tensors go to host this step."""
        return self.offloaded is None or key in self.offloaded

    def begin_forward(self, key: object) -> None:
        self._pending[key] = []

    # -- forward: device -> host -------------------------------------------------------------

    def pack(self, t: torch.Tensor, key: object) -> _Offloaded:
        """Copy t's whole storage to host (as bytes); the caller keeps how t views it."""
        t = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        if self.cuda and t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the allocator reuses t's memory only after the copy
        else:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            host.copy_(t)
        handle = _Offloaded(host)
        self._pending.setdefault(key, []).append(handle)
        self.host_bytes += host.numel()
        self.host_bytes_by_key[key] = self.host_bytes_by_key.get(key, 0) + host.numel()
        return handle

    # -- backward: host -> device ------------------------------------------------------------

    def backward_begins(self, key: object) -> None:
        """Fetch `key`'s tensors (unless prefetched) and prefetch the next backward's."""
        self._fetch_group(key)
        if key in self._order:
            # The next backward in schedule order whose tensors are on the host (under a budget,
            # the micro-batches kept on the device are skipped).
            later = [k for k in self._order[self._order.index(key) + 1:] if self.takes(k)]
            if later:
                self._fetch_group(later[0])

    def _fetch_group(self, key: object) -> None:
        # A group leaves _pending once its fetch is issued; the handles live on in the autograd
        # graph, which frees them (and their device copies) as the backward consumes them.
        if key not in self._pending or not self.takes(key):
            return
        self.fetched_groups.append(key)
        for handle in self._pending.pop(key):
            self._fetch(handle)

    def _fetch(self, handle: _Offloaded) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                handle.device_copy = handle.host.to(self.device, non_blocking=True)
                handle.ready = torch.cuda.Event()
                handle.ready.record(self.stream)
        else:
            handle.device_copy = handle.host.clone()

    def unpack(self, handle: _Offloaded) -> torch.Tensor:
        """The storage's bytes on the device, ready for the compute stream."""
        if handle.device_copy is None:  # a backward that began without notice: fetch now
            self.late_fetches += 1
            self._fetch(handle)
        t = handle.device_copy
        if handle.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(handle.ready)
            t.record_stream(stream)
        return t


def mark_backward_start(output: torch.Tensor, offloader: ActivationOffloader, key: object) -> torch.Tensor:
    """`output` with a gradient hook that tells the offloader that the micro-batch's backward starts:
    the gradient of a stage's output is the first thing its backward computes. (A hook, not an
    identity node: pipeline runtimes detach stage outputs in place, which a view would refuse.)"""
    if output.requires_grad:
        output.register_hook(lambda grad: offloader.backward_begins(key))
    return output

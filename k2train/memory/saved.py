"""What autograd keeps for backward, layer by layer: one saved-tensor hook pair that counts every
saved tensor and, with activation offload, moves it to host memory (K2 §2.4.3).

`torch.autograd.graph.saved_tensors_hooks` applies only the innermost pair of hooks, so counting and
offloading are one pair (`SavedActivations`) rather than two that would hide each other. Inside a
recomputed region torch's checkpoint installs its own pair: what the region would save is not saved
(and so neither counted nor offloaded); the region's inputs, saved outside it, are.

Counting: each saved tensor is attributed to the scope that saved it ("layers.3", "embedding",
"head", "other" for anything outside the model, e.g. the loss) and to where it waits for backward:
`device` (kept where it is) or `offloaded` (copied to host). Each storage is counted once per scope
(a view and its base, or a tensor saved by two ops, are one allocation), and an offloaded storage
is copied whole, once, so both places count whole storages. Tensors that share storage with a parameter or a
buffer (weights saved by a matmul) live anyway and are not counted.

Which tensors are offloaded (`offloadable`): every floating-point saved tensor, FP8 tiles and their
scales included; integer tensors (token indices, expert offsets) are small and stay on the device.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from k2train.memory.offload import ActivationOffloader, mark_backward_start

DEVICE, OFFLOADED = "device", "offloaded"


def storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def offloadable(t: torch.Tensor) -> bool:
    """Floating-point tensors (FP8 included) go to host; integer and bool tensors stay."""
    return t.is_floating_point()


@dataclass
class SavedBytes:
    """Bytes saved for backward per scope and place, over the passes recorded so far."""

    by_scope: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: {DEVICE: 0, OFFLOADED: 0}))
    tokens: int = 0  # tokens of the recorded passes (the per-token denominator)

    def add(self, scope: str, place: str, nbytes: int) -> None:
        self.by_scope[scope][place] += nbytes

    def total(self, place: str | None = None) -> int:
        places = (DEVICE, OFFLOADED) if place is None else (place,)
        return sum(entry[p] for entry in self.by_scope.values() for p in places)

    def per_token(self) -> dict[str, dict[str, float]]:
        """{scope: {"device": bytes/token, "offloaded": bytes/token}}, scopes in model order."""
        if not self.tokens:
            raise ValueError("no tokens were recorded: call SavedActivations.record(...) around a forward first.")
        return {scope: {p: n / self.tokens for p, n in self.by_scope[scope].items()}
                for scope in sorted(self.by_scope, key=_scope_order)}


def _scope_order(scope: str) -> tuple[int, int]:
    if scope == "embedding":
        return 0, 0
    if scope.startswith("layers."):
        return 1, int(scope.split(".")[1])
    return (2, 0) if scope == "head" else (3, 0)


class LayerScopes:
    """Names the model scope that is running (forward hooks on the embedding, each decoder layer
    and the head), so a saved tensor can be attributed to its layer. The model is not changed.

    Each thread has its own scope stack: with communication overlap a backward (and the forwards it
    recomputes) takes turns with another micro-batch's forward (parallel/pipeline/overlap.py)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._handles: list = []
        self.on_change = lambda: None  # called whenever the calling thread's scope changes

    @property
    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @property
    def current(self) -> str:
        return self._stack[-1] if self._stack else "other"

    def attach(self, models: Iterable[nn.Module]) -> None:
        for model in models:
            named = dict(model.named_modules())
            scopes = [("embedding", "embed_tokens"), ("head", "norm"), ("head", "lm_head")]
            scopes += [(name, name) for name in named if name.startswith("layers.") and name.count(".") == 1]
            for scope, name in scopes:
                if named.get(name) is not None:
                    self._handles.append(named[name].register_forward_pre_hook(self._enter(scope)))
                    self._handles.append(named[name].register_forward_hook(self._leave))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, scope: str):
        def hook(module, args):
            self._stack.append(scope)
            self.on_change()
        return hook

    def _leave(self, module, args, output) -> None:
        self._stack.pop()
        self.on_change()


class SavedActivations:
    """The saved-tensor hooks of a rank's model parts: counting always, offloading with an `offloader`.

    Use `with saved.record(key, tokens): out = model(x)` around each micro-batch's forward; `key`
    names the micro-batch (e.g. (stage, index)) for the offloader's prefetch order.
    """

    def __init__(self, models: Iterable[nn.Module], offloader: ActivationOffloader | None = None):
        models = list(models)
        self.offloader = offloader
        self.bytes = SavedBytes()
        self._live = {storage_key(t) for m in models for t in [*m.parameters(), *m.buffers()]}
        self.scopes = LayerScopes()
        self.scopes.attach(models)
        self.scopes.on_change = self._scope_changed
        self._recording: int | None = None  # the thread inside `record`, whose scopes count
        # Within one scope: storages already counted, host copies already made, and the saved
        # tensors themselves (held until the scope ends so no address is reused mid-scope).
        self._seen: set[tuple[torch.device, int]] = set()
        self._copies: dict[tuple, object] = {}
        self._held: list[torch.Tensor] = []
        self._key = None

    def close(self) -> None:
        self.scopes.detach()

    def _scope_changed(self) -> None:
        if threading.get_ident() == self._recording:
            self._new_scope()

    def _new_scope(self) -> None:
        self._seen.clear()
        self._copies.clear()
        self._held.clear()

    @contextmanager
    def record(self, key: object, tokens: int) -> Iterator[None]:
        self._key, self._recording = key, threading.get_ident()
        if self.offloader is not None:
            self.offloader.begin_forward(key)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._new_scope()
            self._key, self._recording = None, None
            self.bytes.tokens += tokens

    def mark_backward_start(self, output: torch.Tensor, key: object) -> torch.Tensor:
        """The micro-batch's output, with the offloader's backward-start notice when offloading."""
        return output if self.offloader is None else mark_backward_start(output, self.offloader, key)

    def _pack(self, t: torch.Tensor) -> object:
        skey = storage_key(t)
        if skey in self._live:
            return t
        self._held.append(t)
        offload = self.offloader is not None and offloadable(t) and self.offloader.takes(self._key)
        if skey not in self._seen:
            self.bytes.add(self.scopes.current, OFFLOADED if offload else DEVICE, t.untyped_storage().nbytes())
        self._seen.add(skey)
        if not offload:
            return t
        # One host copy per storage: views saved by several ops share it, as on the device.
        if skey not in self._copies:
            self._copies[skey] = self.offloader.pack(t, self._key)
        return _SavedView(self._copies[skey], t.dtype, t.storage_offset(), tuple(t.shape), t.stride())

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        storage = self.offloader.unpack(packed.copy)
        return torch.empty(0, dtype=packed.dtype, device=storage.device).set_(
            storage.untyped_storage(), packed.offset, packed.shape, packed.stride)


@dataclass(frozen=True)
class _SavedView:
    """An offloaded saved tensor: its storage's host copy and how the tensor views that storage."""

    copy: object
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

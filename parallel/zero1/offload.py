"""Where the owner's ZeRO-1 optimizer states live, and how a chunk of them reaches the update.

K2 trains on as few as 32 nodes; there the owners' float32 master weights, Muon momentum and AdamW
moments no longer fit beside the activations, so optimizer states go to CPU memory (K2 §2.4,
memory.optimizer_offload). The owner updates its items chunk by chunk: a chunk is a run of owned
items, consecutive in the owner's flat state, holding at most `chunk_bytes` of float32 state (AdamW
items are cut anywhere, a Muon matrix never: Newton-Schulz needs it whole, so one larger than the
budget is a chunk alone).

- `DeviceStates`: the states stay on the device and a chunk is a view of them.
- `OffloadedStates`: the states stay in host memory (pinned on CUDA, so copies are asynchronous) and
  a ring of three device buffer sets carries them: while chunk i updates on the compute stream,
  chunk i+1 copies host -> device on one side stream and chunk i-1 device -> host on another (the
  two directions have their own copy engines, hence three buffers, not two). On CPU the copies run
  in order, but through the same separate buffers: copy in, update, copy out.

Both run the same chunk plan, so Newton-Schulz batches the same matrices together and a step gives
bit-identical parameters and states with offload on or off, whatever the GEMM library does with
batch sizes. The offloaded update also writes the parameter-dtype copy of each updated chunk into
the all_gather input, so no full-size float32 master is ever on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 256 << 20
RING = 3  # device buffer sets of OffloadedStates: loading, updating, writing back


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of owned item `index` (a Muon matrix is always whole)."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class Chunk:
    """Consecutive pieces of owned items: their master / moment1 range [lo, hi) and their AdamW
    second-moment range [m2_lo, m2_hi) in the owner's flat states."""

    pieces: tuple[Piece, ...]
    lo: int
    hi: int
    m2_lo: int
    m2_hi: int

    def state_bytes(self) -> int:
        return 4 * (2 * (self.hi - self.lo) + self.m2_hi - self.m2_lo)


def plan_chunks(items: Sequence[tuple[int, bool]], chunk_bytes: int) -> list[Chunk]:
    """Cut the owned items (numel, uses Muon), in order, into consecutive chunks of at most
    `chunk_bytes` of float32 state each: master + momentum for Muon, master + two moments for AdamW.

    Newton-Schulz needs a Muon matrix whole, so one larger than the budget is a chunk alone. AdamW is
    elementwise, so its items are cut at any element: a row block of K2's embedding or output head
    (up to optimizer.adamw_block_elements = 67M elements, 805 MB of AdamW state) streams in
    budget-sized pieces like everything else."""
    if chunk_bytes <= 0:
        raise ValueError(f"optimizer chunk size {chunk_bytes} bytes must be positive (memory.optimizer_chunk_mb).")
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    lo = hi = m2_lo = m2_hi = size = 0

    def close() -> None:
        nonlocal pieces, lo, m2_lo, size
        chunks.append(Chunk(tuple(pieces), lo, hi, m2_lo, m2_hi))
        pieces, lo, m2_lo, size = [], hi, m2_hi, 0

    for index, (numel, muon) in enumerate(items):
        per_element = 8 if muon else 12
        start = 0
        while start < numel:
            room = max(chunk_bytes - size, 0) // per_element
            take = numel - start if muon else min(numel - start, room)
            if pieces and (take == 0 or take > room):
                close()
                continue
            take = max(take, 1)
            pieces.append(Piece(index, start, start + take))
            start += take
            size += take * per_element
            hi += take
            m2_hi += 0 if muon else take
    if pieces:
        close()
    return chunks


def chunk_buffer_elements(chunks: Sequence[Chunk]) -> int:
    """float32 elements of one device buffer set of OffloadedStates: the largest chunk's states."""
    return max((c.state_bytes() // 4 for c in chunks), default=0)


class _Layout:
    """Offsets of the owned items (shape, uses Muon) in the flat states, and the chunk plan."""

    def __init__(self, items: Sequence[tuple[torch.Size, bool]], chunk_bytes: int):
        self.shapes = [torch.Size(shape) for shape, _ in items]
        numels = [shape.numel() for shape in self.shapes]
        self.offsets, self.m2_offsets = [], []
        numel = m2_numel = 0
        for n, (_, muon) in zip(numels, items):
            self.offsets.append(numel)
            self.m2_offsets.append(None if muon else m2_numel)
            numel += n
            m2_numel += 0 if muon else n
        self.numel, self.m2_numel = numel, m2_numel
        self.chunks = plan_chunks([(n, muon) for n, (_, muon) in zip(numels, items)], chunk_bytes)

    def state_bytes(self) -> int:
        return 4 * (2 * self.numel + self.m2_numel)

    def whole(self, index: int) -> Piece:
        return Piece(index, 0, self.shapes[index].numel())

    def view(self, flat: Tensor, piece: Piece, base: int = 0, second_moment: bool = False) -> Tensor:
        """A piece's state in `flat`, a tensor holding the flat states from offset `base` on: the
        item's shape when whole, else flat."""
        offsets = self.m2_offsets if second_moment else self.offsets
        if offsets[piece.index] is None:
            raise KeyError(f"owned item {piece.index} uses Muon and has no AdamW second moment.")
        start = offsets[piece.index] + piece.start - base
        part = flat[start:start + piece.stop - piece.start]
        shape = self.shapes[piece.index]
        return part.view(shape) if piece.stop - piece.start == shape.numel() else part


class ChunkStates:
    """One chunk's states where the update reads and writes them (device views or device buffers),
    addressed by piece."""

    def __init__(self, layout: _Layout, chunk: Chunk, master_C: Tensor, moment1_C: Tensor, moment2_C: Tensor):
        self.layout, self.chunk = layout, chunk
        self.master_C, self.moment1_C, self.moment2_C = master_C, moment1_C, moment2_C

    @property
    def pieces(self) -> tuple[Piece, ...]:
        return self.chunk.pieces

    def master(self, piece: Piece) -> Tensor:
        return self.layout.view(self.master_C, piece, self.chunk.lo)

    def moment1(self, piece: Piece) -> Tensor:
        return self.layout.view(self.moment1_C, piece, self.chunk.lo)

    def moment2(self, piece: Piece) -> Tensor:
        return self.layout.view(self.moment2_C, piece, self.chunk.m2_lo, second_moment=True)


class DeviceStates:
    """Owner states on the device: `master` spans the whole padded region (it is the all_gather
    input when the parameters are float32), the moments span the owned items."""

    offloaded = False

    def __init__(self, items: Sequence[tuple[torch.Size, bool]], chunk_bytes: int, device: torch.device, region: int):
        self.layout = _Layout(items, chunk_bytes)
        self.master = torch.zeros(max(region, self.layout.numel), dtype=torch.float32, device=device)
        self.moment1 = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)
        self.moment2 = torch.zeros(self.layout.m2_numel, dtype=torch.float32, device=device)

    def master_view(self, index: int) -> Tensor:
        return self.layout.view(self.master, self.layout.whole(index))

    def moment1_view(self, index: int) -> Tensor:
        return self.layout.view(self.moment1, self.layout.whole(index))

    def moment2_view(self, index: int) -> Tensor:
        return self.layout.view(self.moment2, self.layout.whole(index), second_moment=True)

    def chunks(self, param_dtype: torch.dtype) -> Iterator[ChunkStates]:
        for c in self.layout.chunks:
            yield ChunkStates(self.layout, c, self.master[c.lo:c.hi], self.moment1[c.lo:c.hi],
                              self.moment2[c.m2_lo:c.m2_hi])

    def gather_input(self, param_dtype: torch.dtype) -> Tensor:
        """The owner's region in the parameter dtype (the masters themselves when that is float32)."""
        return self.master.to(param_dtype)

    def bytes_by_place(self) -> dict[str, int]:
        return {"device": self.layout.state_bytes(), "host": 0}


class OffloadedStates(DeviceStates):
    """Owner states in host memory, streamed through RING device buffer sets chunk by chunk."""

    offloaded = True

    def __init__(self, items: Sequence[tuple[torch.Size, bool]], chunk_bytes: int, device: torch.device, region: int):
        self.layout = layout = _Layout(items, chunk_bytes)
        self.device, self.region = device, region
        self.cuda = device.type == "cuda"
        host = dict(dtype=torch.float32, device="cpu", pin_memory=self.cuda)
        self.master = torch.zeros(layout.numel, **host)
        self.moment1 = torch.zeros(layout.numel, **host)
        self.moment2 = torch.zeros(layout.m2_numel, **host)
        # One flat buffer per set, as wide as the largest chunk: master | moment1 | moment2.
        widest = chunk_buffer_elements(layout.chunks)
        self.buffers = [torch.zeros(widest, dtype=torch.float32, device=device) for _ in range(RING)]
        if self.cuda:
            self.to_device, self.to_host = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self._gather_input: Tensor | None = None

    def chunks(self, param_dtype: torch.dtype) -> Iterator[ChunkStates]:
        """Yield each chunk's device working copy; once the caller is done with it, copy its masters
        into the all_gather input and its states back to the host, while later chunks load."""
        plan = self.layout.chunks
        self._gather_input = torch.zeros(self.region, dtype=param_dtype, device=self.device)
        loaded: list[torch.cuda.Event | None] = [None] * RING
        freed: list[torch.cuda.Event | None] = [None] * RING  # the buffer's last write-back is done
        if plan:
            loaded[0] = self._copy(self._pairs(plan[0], 0, to_device=True), None, to_device=True)
        for i, chunk in enumerate(plan):
            b = i % RING
            if i + 1 < len(plan):
                nb = (i + 1) % RING
                loaded[nb] = self._copy(self._pairs(plan[i + 1], nb, to_device=True), freed[nb], to_device=True)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(loaded[b])
            work = ChunkStates(self.layout, chunk, *self._working(chunk, b))
            yield work
            self._gather_input[chunk.lo:chunk.hi].copy_(work.master_C)
            updated = torch.cuda.current_stream(self.device).record_event() if self.cuda else None
            freed[b] = self._copy(self._pairs(chunk, b, to_device=False), updated, to_device=False)
        if self.cuda:
            # The host states are whole again before anyone reads them (a checkpoint, the next step).
            self.to_host.synchronize()

    def _working(self, chunk: Chunk, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk's master, moment1 and moment2 in device buffer set b."""
        n, m2 = chunk.hi - chunk.lo, chunk.m2_hi - chunk.m2_lo
        buffer = self.buffers[b]
        return buffer[:n], buffer[n:2 * n], buffer[2 * n:2 * n + m2]

    def _pairs(self, chunk: Chunk, b: int, to_device: bool) -> list[tuple[Tensor, Tensor]]:
        """(destination, source) of a chunk's three states between host and device buffer set b."""
        host = (self.master[chunk.lo:chunk.hi], self.moment1[chunk.lo:chunk.hi], self.moment2[chunk.m2_lo:chunk.m2_hi])
        pairs = list(zip(self._working(chunk, b), host))
        return pairs if to_device else [(h, d) for d, h in pairs]

    def _copy(self, pairs: list[tuple[Tensor, Tensor]], after: torch.cuda.Event | None,
              to_device: bool) -> torch.cuda.Event | None:
        """Copy on the direction's side stream once `after` has happened; the event of its end."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        stream = self.to_device if to_device else self.to_host
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            return stream.record_event()

    def gather_input(self, param_dtype: torch.dtype) -> Tensor:
        """The owner's region in the parameter dtype, as the last update wrote it chunk by chunk."""
        mine, self._gather_input = self._gather_input, None
        if mine is None:
            raise RuntimeError("the offloaded optimizer gathers the values of an update; call update() first.")
        return mine

    def bytes_by_place(self) -> dict[str, int]:
        """Host: every state; device: the RING working buffer sets (each sized for the largest chunk)."""
        device = sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)
        return {"device": device, "host": self.layout.state_bytes()}

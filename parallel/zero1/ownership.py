"""Which rank owns each optimizer item under ZeRO-1 MuonClip (docs/ARCHITECTURE.md#zero-1): a pure assignment.

An item is what one owner updates whole: a 2-D hidden matrix, one expert's matrix of a 3-D expert
stack (each expert is its own Muon matrix, docs/ARCHITECTURE.md#zero-1), or an AdamW parameter (embedding, head,
norms, 1-D parameters). Newton–Schulz on a slice of a matrix is a different function, not an
approximation, so Muon items are never split; the owner keeps the FP32 master weight and the
optimizer state, runs Newton–Schulz once, and the group all-gathers the new values.

AdamW is elementwise, so a large AdamW parameter is cut into row blocks, each its own item: K2's
embedding and head (163840 x 7168 = 1.17B elements each) would otherwise set every owner's padded
gradient region. A parameter of more than `block_elements` elements (optimizer.adamw_block_elements)
becomes consecutive blocks of `block_elements // row` rows along dim 0, keyed `name[rows a:b]`. The
cut depends only on the shape and that setting, never on the layout, so every layout has the same
items and keys, and checkpoints (keyed by item) reshard.

Owners are chosen by a deterministic greedy over the gradient-reduction group, largest first: Muon
items by Newton–Schulz FLOPs onto the rank with the fewest FLOPs, then AdamW items by element count
onto the rank owning the fewest elements so far (Muon's included). Every rank of a group calls
`assign_owners` with the same items in the same order and gets the same answer, so no
communication is needed to agree on it. Nothing here allocates: shapes are read from meta
tensors or given as tuples.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from k2train.config.schema import OptimizerConfig
from k2train.optim.muon_clip import split_param_groups

# Optimizer-state bytes per owned element (docs/ARCHITECTURE.md#zero-1): the FP32 master weight for every element,
# plus Muon's FP32 momentum, or AdamW's two FP32 moments.
MASTER_BYTES = 4
MUON_STATE_BYTES = 4
ADAMW_STATE_BYTES = 8
# AdamW parameters above this many elements are cut into row blocks: the default of
# optimizer.adamw_block_elements (2**24; why that size: see OptimizerConfig).
ADAMW_BLOCK_ELEMENTS = OptimizerConfig.adamw_block_elements


def expert_key(name: str, expert: int) -> str:
    """The item key of global expert `expert` of a 3-D expert stack `name` (also its checkpoint key)."""
    return f"{name}[{expert}]"


def row_block_key(name: str, start: int, stop: int) -> str:
    """The item key of rows [start, stop) of a large AdamW parameter `name` (also its checkpoint key)."""
    return f"{name}[rows {start}:{stop}]"


def row_blocks(shape: Sequence[int], block_elements: int) -> list[tuple[int, int]] | None:
    """The [start, stop) row ranges an AdamW parameter of `shape` is cut into, or None to keep it whole.

    Above `block_elements` elements: consecutive blocks of max(1, block_elements // row) rows along
    dim 0 (the last one shorter), where row is the elements of one row. A parameter that would still
    be one block (a single huge row) stays whole.
    """
    if block_elements < 1:
        raise ValueError(f"optimizer.adamw_block_elements must be at least 1, got {block_elements}.")
    if not shape or math.prod(shape) <= block_elements:
        return None
    rows = max(1, block_elements // math.prod(shape[1:]))
    if rows >= shape[0]:
        return None
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def is_expert_param(name: str) -> bool:
    """Routed-expert parameters: sharded over EP, their gradients reduced over DP only (docs/ARCHITECTURE.md#layout)."""
    return ".mlp.experts." in name


@dataclass(frozen=True)
class OptItem:
    """One unit of ownership: a parameter, `name[e]` for global expert e of a 3-D expert stack, or
    `name[rows a:b]` for a row block of a large AdamW parameter."""

    key: str
    shape: tuple[int, ...]  # (n, m) for a Muon matrix; the parameter's (or its row block's) shape for AdamW
    muon: bool  # True: Muon (a hidden matrix or one expert's matrix); False: AdamW
    rows: tuple[int, int] | None = None  # the [start, stop) rows of the parameter a row block holds

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrices(self) -> int:
        """Matrices Newton–Schulz orthogonalises for this item: 1 for an [n, m] item, 0 for AdamW.

        A Muon parameter with leading dims other than an expert stack counts each [n, m] slice.
        """
        return math.prod(self.shape[:-2]) if self.muon else 0

    @property
    def state_bytes(self) -> int:
        """Bytes its owner keeps: master weight plus Muon momentum or AdamW moments."""
        return self.numel * (MASTER_BYTES + (MUON_STATE_BYTES if self.muon else ADAMW_STATE_BYTES))


@dataclass(frozen=True)
class ItemPlace:
    """Where an item lives in the (name, parameter) pairs it came from: `named_params[position][1][part]`,
    where part is the local index i of expert first_expert + i, a row slice, or None (the whole parameter)."""

    item: OptItem
    position: int
    part: int | slice | None


def item_places(named_params: Iterable[tuple[str, torch.Tensor | Sequence[int]]], first_expert: int,
                block_elements: int = ADAMW_BLOCK_ELEMENTS) -> list[ItemPlace]:
    """The optimizer items of (name, tensor or shape) pairs, in the parameters' order, with where
    each lives in them.

    Muon or AdamW exactly as `k2train.optim.muon_clip.split_param_groups` decides (ndim >= 2 except
    the embedding and the head); a frozen tensor is dropped as that function drops it, and a bare
    shape counts as trainable. A 3-D expert stack [E_local, n, m] named `...mlp.experts.<proj>`
    becomes E_local Muon items `...mlp.experts.<proj>[e]`, e = first_expert + i, in expert order;
    an AdamW parameter above `block_elements` elements becomes its row blocks (`row_blocks`), in
    row order. Only shapes are read, so meta tensors work.
    """
    named = [(name, _as_tensor(value)) for name, value in named_params]
    muon_names = {name for name, _ in split_param_groups(named)[0]}
    places = []
    for position, (name, tensor) in enumerate(named):
        if not tensor.requires_grad:
            continue
        shape = tuple(tensor.shape)
        muon = name in muon_names
        blocks = None if muon else row_blocks(shape, block_elements)
        if muon and is_expert_param(name) and len(shape) == 3:
            places += [ItemPlace(OptItem(expert_key(name, first_expert + i), shape[1:], True), position, i)
                       for i in range(shape[0])]
        elif blocks is not None:
            places += [ItemPlace(OptItem(row_block_key(name, a, b), (b - a, *shape[1:]), False, (a, b)),
                                 position, slice(a, b)) for a, b in blocks]
        else:
            places.append(ItemPlace(OptItem(name, shape, muon), position, None))
    return places


def items_of(named_params: Iterable[tuple[str, torch.Tensor | Sequence[int]]], first_expert: int,
             block_elements: int = ADAMW_BLOCK_ELEMENTS) -> list[OptItem]:
    """The optimizer items of (name, tensor or shape) pairs, in order (`item_places` without places)."""
    return [place.item for place in item_places(named_params, first_expert, block_elements)]


def _as_tensor(value: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A tensor as given, or a trainable meta tensor of the given shape (no memory)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.empty(tuple(value), device="meta", requires_grad=True)


def newton_schulz_flops(n: int, m: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` quintic Newton–Schulz iterations on one [n, m] matrix.

    As `k2train.optim.newton_schulz` runs it, on X [a, b] with a = min(n, m), b = max(n, m) (tall
    matrices are transposed so the Gram matrix is the small one), each iteration computes
    A = X·Xᵀ (2·a·a·b), A·A (2·a³) and B·X (2·a·a·b), counting a multiply-add as 2 FLOPs:
    steps · (4·a²·b + 2·a³). The normalisation and the elementwise terms (O(a·b)) are left out.
    """
    a, b = min(n, m), max(n, m)
    return steps * (4 * a * a * b + 2 * a**3)


def item_cost(item: OptItem, ns_steps: int = 5) -> int:
    """What an item costs its owner: Newton–Schulz FLOPs for a Muon item (each [n, m] slice), its
    element count for an AdamW item (AdamW is elementwise, so time and state both scale with it)."""
    if item.muon:
        return item.matrices * newton_schulz_flops(item.shape[-2], item.shape[-1], ns_steps)
    return item.numel


def assign_owners(items: Sequence[OptItem], group_size: int, ns_steps: int = 5) -> list[int]:
    """The owner (0..group_size-1, the index within the reduction group) of each item.

    Two greedy passes, each taking its items largest first (a stable sort on -cost, so equal costs
    keep the items' order) onto the least-loaded rank (ties: the lower rank):
    1. Muon items by Newton–Schulz FLOPs, from zero loads: the update time;
    2. AdamW items by element count, starting from the elements each rank owns after pass 1. An
       owner's elements set its region of the padded gradient buffer (parallel/zero1/optimizer.py), and
       AdamW's time and state scale with them too, so this pass evens out the owners' elements.
    Largest-first bounds the maximum Muon load by its mean plus the largest Muon item, and the
    maximum owned elements by the larger of the most after pass 1 and the mean plus the largest
    AdamW item. Deterministic: equal inputs give equal owners on every rank and every call.
    """
    if group_size < 1:
        raise ValueError(f"a reduction group has at least 1 rank, got group_size {group_size}.")
    owners = [0] * len(items)
    elements = [0] * group_size
    for muon in (True, False):
        indices = [i for i, item in enumerate(items) if item.muon == muon]
        costs = {i: item_cost(items[i], ns_steps) for i in indices}
        heap = [(0 if muon else elements[rank], rank) for rank in range(group_size)]
        heapq.heapify(heap)
        for i in sorted(indices, key=lambda i: -costs[i]):
            load, rank = heapq.heappop(heap)
            owners[i] = rank
            elements[rank] += items[i].numel
            heapq.heappush(heap, (load + costs[i], rank))
    return owners


@dataclass(frozen=True)
class OwnerLoad:
    """What each rank of one reduction group owns, indexed by group rank."""

    ns_flops: list[int]  # Newton–Schulz FLOPs per optimizer step
    muon_numel: list[int]  # elements of owned Muon items
    adamw_numel: list[int]  # elements of owned AdamW items

    @property
    def group_size(self) -> int:
        return len(self.ns_flops)

    def optimizer_state_bytes(self, rank: int) -> int:
        """FP32 master weights of every owned element, Muon momentum and AdamW moments."""
        muon, adamw = self.muon_numel[rank], self.adamw_numel[rank]
        return (muon + adamw) * MASTER_BYTES + muon * MUON_STATE_BYTES + adamw * ADAMW_STATE_BYTES

    def imbalance(self) -> float:
        """max / mean of the Newton–Schulz FLOPs over the group (1.0 is perfect; 1.0 if there are none)."""
        return _max_over_mean(self.ns_flops)

    def bytes_imbalance(self) -> float:
        """max / mean of the optimizer-state bytes over the group (1.0 if there are none)."""
        return _max_over_mean([self.optimizer_state_bytes(r) for r in range(self.group_size)])


def _max_over_mean(values: list[int]) -> float:
    total = sum(values)
    return max(values) * len(values) / total if total else 1.0


def owner_loads(items: Sequence[OptItem], owners: Sequence[int], group_size: int, ns_steps: int = 5) -> OwnerLoad:
    """Sum each rank's Newton–Schulz FLOPs and owned elements from an assignment of `items`."""
    if len(owners) != len(items):
        raise ValueError(f"owner_loads got {len(owners)} owners for {len(items)} items; expected one per item.")
    flops, muon, adamw = [0] * group_size, [0] * group_size, [0] * group_size
    for item, rank in zip(items, owners):
        if not 0 <= rank < group_size:
            raise ValueError(f"owner {rank} of item {item.key} is outside the group's ranks 0..{group_size - 1}.")
        if item.muon:
            flops[rank] += item_cost(item, ns_steps)
            muon[rank] += item.numel
        else:
            adamw[rank] += item.numel
    return OwnerLoad(flops, muon, adamw)

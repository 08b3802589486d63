"""MuonClip sharded ZeRO-1 style with whole-matrix ownership (K2 §2.1, §2.4; docs/ARCHITECTURE.md#zero-1).

Every optimizer item (a hidden matrix, one expert's matrix, a non-matrix parameter, or a row block
of a large AdamW parameter such as the embedding or the head) is owned whole by one rank of its
gradient-reduction group: the EP x DP ranks of a stage for dense parameters, the DP ranks for
expert parameters (`parallel/zero1/ownership.py`, largest first onto the least-loaded rank: Muon items by
Newton-Schulz FLOPs, then AdamW items by the owners' elements). Per step and group:

1. gradients accumulate, micro-batch by micro-batch, into one float32 buffer laid out as G equal
   regions, region r holding (padded) the items rank r owns;
2. one reduce_scatter over the group delivers to each owner the summed full gradients of its
   items, and nothing else;
3. the owner updates its float32 master weights chunk by chunk (`parallel/zero1/offload.py`;
   the states stay on the device or, with memory.optimizer_offload, in host memory): Muon
   (Newton-Schulz once per matrix, the chunk's same-shape matrices batched) or AdamW, with the same
   per-tensor rules as the single-process MuonClip;
4. QK-Clip scales the chunk's owned q_b_proj / kv_b_proj master rows (the max logits are already global);
5. one all_gather (in the parameters' dtype, so bf16 parameters move half the bytes) gives every
   rank the new values of every parameter it holds, so replicas stay bit-identical.
Newton-Schulz therefore runs exactly once per matrix across the group, unlike Moonlight's
Distributed Muon (gather, then orthogonalise on every holder), and nobody all-reduces full gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2train.config.schema import OptimizerConfig
from k2train.optim.muon_clip import adamw_update_, apply_muon_update_, muon_momentum_
from k2train.optim.newton_schulz import newton_schulz_many
from k2train.optim.qk_clip import clip_kv_rows_, clip_q_rows_, qk_clip_scales
from parallel.collectives import Collectives
from parallel.zero1.offload import DEFAULT_CHUNK_BYTES, ChunkStates, DeviceStates, OffloadedStates, Piece
from parallel.zero1.ownership import OptItem, assign_owners, is_expert_param, item_places


@dataclass
class _Slot:
    """One item: its parameter (and part of it), its owner, and where it sits in the flat buffers."""

    item: OptItem
    param: nn.Parameter
    index: int | slice | None  # the expert of a 3-D stack, the rows of an AdamW row block, else None
    owner: int
    offset: int  # within the owner's region

    @property
    def data(self) -> Tensor:
        return self.param.data if self.index is None else self.param.data[self.index]

    def grad(self) -> Tensor | None:
        grad = self.param.grad
        return grad if grad is None or self.index is None else grad[self.index]


class ShardGroup:
    """The items of one gradient-reduction group, as this rank sees them."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], first_expert: int,
                 group: dist.ProcessGroup | None, cfg: OptimizerConfig, offload: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, collectives: Collectives | None = None):
        self.group = group
        self.collectives = Collectives() if collectives is None else collectives
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.cfg = cfg
        places = item_places(named_params, first_expert, cfg.adamw_block_elements)
        owners = assign_owners([place.item for place in places], self.size, cfg.ns_steps)
        fill = [0] * self.size
        self.slots: list[_Slot] = []
        for place, owner in zip(places, owners, strict=True):
            param = named_params[place.position][1]
            self.slots.append(_Slot(place.item, param, place.part, owner, fill[owner]))
            fill[owner] += place.item.numel
        self.params = list(dict.fromkeys(p for _, p in named_params))
        self.region = max(max(fill), 1)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.grads = torch.zeros(self.size * self.region, dtype=torch.float32, device=device)
        self.owned = [s for s in self.slots if s.owner == self.rank]
        # A group of one rank owns its whole buffer: the reduced gradients stay where they were
        # accumulated, so the owner region is the buffer itself, not a second copy of it (at K2's
        # scale with dp = 1 the expert group's buffer is 13-17 GB per GPU).
        self.grad_region = self.grads if self.group is None else torch.zeros(self.region, dtype=torch.float32,
                                                                             device=device)
        self._reduced = False  # the buffer holds the last step's reduced gradients (a group of one)
        # Owner state: float32 master weights, Muon momentum / AdamW first moment, AdamW second moment,
        # laid out in owner order as the gradient region is (the same offsets).
        places = OffloadedStates if offload else DeviceStates
        self.states = places([(s.item.shape, s.item.muon) for s in self.owned], chunk_bytes, device, self.region)
        self.adam_steps = 0
        self.masters_from_parameters()
        self.param_dtype = self.params[0].dtype if self.params else torch.float32
        self._slots_of = {id(p): [s for s in self.slots if s.param is p] for p in self.params}
        # Gradients leave the parameters as soon as autograd has accumulated them, so micro-batches
        # add up in float32 whatever the parameter dtype.
        for param in self.params:
            param.register_post_accumulate_grad_hook(self._accumulate_param)

    # -- buffers ---------------------------------------------------------------------------------

    def _flat(self, slot: _Slot) -> Tensor:
        start = slot.owner * self.region + slot.offset
        return self.grads[start:start + slot.item.numel].view(slot.item.shape)

    def _own(self, region: Tensor, slot: _Slot) -> Tensor:
        return region[slot.offset:slot.offset + slot.item.numel].view(slot.item.shape)

    @property
    def master(self) -> Tensor:
        """The owner's flat float32 master weights (in host memory when offloaded)."""
        return self.states.master

    def optimizer_state_bytes(self) -> int:
        """Bytes of master weights and optimizer states this rank keeps for the group."""
        return self.states.layout.state_bytes()

    def optimizer_state_bytes_by_place(self) -> dict[str, int]:
        """{"device": .., "host": ..}: all states on the device, or with offload all on the host and
        the device holding only the working buffers of the largest chunk (RING sets)."""
        return self.states.bytes_by_place()

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def _accumulate_param(self, param: nn.Parameter) -> None:
        """Add a parameter's .grad into the float32 buffer and free it. A backward that deferred a
        weight's gradient (k2train/memory/weight_grads.py) runs its accumulation with none: nothing to add."""
        if param.grad is None:
            return
        self._start_accumulating()
        for slot in self._slots_of[id(param)]:
            self._flat(slot).add_(slot.grad())
        param.grad = None

    def accumulate_leftovers(self) -> None:
        """Move gradients that reached .grad without the hook (a backward path that assigns .grad)."""
        for param in self.params:
            if param.grad is not None:
                self._accumulate_param(param)

    @torch.no_grad()
    def reduce(self, divisor: float) -> None:
        """reduce_scatter(SUM) the buffer so each owner holds its items' summed gradients, / divisor."""
        if self.group is None:
            self._start_accumulating()  # a step that accumulated nothing reduces zeros
            self._reduced = True  # kept in place until the next step's first gradient
        else:
            self.collectives.reduce_scatter(self.grad_region, self.grads, op=dist.ReduceOp.SUM, group=self.group)
            self.grads.zero_()
        self.grad_region.div_(divisor)

    def _start_accumulating(self) -> None:
        """Clear the last step's reduced gradients (kept in the buffer by a group of one) before
        the first gradient of the next step is added."""
        if self._reduced:
            self.grads.zero_()
            self._reduced = False

    def owned_square_norm(self) -> Tensor:
        return self.grad_region.double().square().sum()

    @torch.no_grad()
    def update(self, lr: float, clip_coef: float, gamma_by_layer: dict[int, Tensor] | None = None,
               attention_dims: tuple[int, int, int] | None = None) -> None:
        """Muon and AdamW on the owned master weights, chunk by chunk, each chunk's attention
        matrices then QK-Clipped with `gamma_by_layer` (before the gather)."""
        if clip_coef < 1.0:
            self.grad_region.mul_(clip_coef)
        self.adam_steps += 1
        for work in self.states.chunks(self.param_dtype):
            self._update_chunk(work, lr)
            if gamma_by_layer:
                self._qk_clip_chunk(work, gamma_by_layer, attention_dims)

    def _update_chunk(self, work: ChunkStates, lr: float) -> None:
        """Muon (Newton-Schulz batched over the chunk's same-shape matrices) and AdamW on one chunk."""
        cfg = self.cfg
        muon = [p for p in work.pieces if self.owned[p.index].item.muon]
        ns_inputs = [muon_momentum_(self._grad(p), work.moment1(p), cfg.muon_momentum, cfg.nesterov) for p in muon]
        dtype = getattr(torch, cfg.ns_dtype)
        for piece, orthogonal in zip(muon, newton_schulz_many(ns_inputs, cfg.ns_steps, cfg.ns_coefficients, dtype)):
            apply_muon_update_(work.master(piece), orthogonal, lr, cfg.weight_decay, cfg.update_rms)
        for piece in (p for p in work.pieces if not self.owned[p.index].item.muon):
            adamw_update_(work.master(piece), self._grad(piece), work.moment1(piece), work.moment2(piece),
                          float(self.adam_steps), lr, cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)

    def _grad(self, piece: Piece) -> Tensor:
        """The piece's reduced gradient: the owned item's shape when whole (Muon's always are), else flat."""
        slot = self.owned[piece.index]
        if piece.stop - piece.start == slot.item.numel:
            return self._own(self.grad_region, slot)
        return self.grad_region[slot.offset + piece.start:slot.offset + piece.stop]

    def _qk_clip_chunk(self, work: ChunkStates, gamma_by_layer: dict[int, Tensor], dims: tuple[int, int, int]) -> None:
        """Scale the chunk's owned q_b_proj / kv_b_proj master rows of clipped heads (Muon matrices, whole)."""
        nope, rope, v = dims
        for piece in work.pieces:
            layer, kind = _attention_matrix(self.owned[piece.index].item.key)
            if layer in gamma_by_layer and kind == "q_b_proj":
                clip_q_rows_(work.master(piece), gamma_by_layer[layer], nope, rope)
            elif layer in gamma_by_layer and kind == "kv_b_proj":
                clip_kv_rows_(work.master(piece), gamma_by_layer[layer], nope, v)

    @torch.no_grad()
    def gather(self) -> None:
        """all_gather the owners' new values (in the parameter dtype) into every rank's parameters."""
        mine = self.states.gather_input(self.param_dtype)
        if self.group is None:
            gathered = mine
        else:
            gathered = torch.empty(self.size * self.region, dtype=self.param_dtype, device=mine.device)
            self.collectives.all_gather_into_tensor(gathered, mine, group=self.group)
        for slot in self.slots:
            start = slot.owner * self.region + slot.offset
            slot.data.copy_(gathered[start:start + slot.item.numel].view(slot.item.shape))

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Views of what a checkpoint keeps, by logical key (layout-independent), one per item:
        every held parameter value (an expert stack as one key per expert, a large AdamW parameter
        as one key per row block) and the owned optimizer state (views into host memory when offloaded)."""
        tensors = {f"model/{s.item.key}": s.data for s in self.slots}
        for i, s in enumerate(self.owned):
            tensors[f"optim/master/{s.item.key}"] = self.states.master_view(i)
            tensors[f"optim/moment1/{s.item.key}"] = self.states.moment1_view(i)
            if not s.item.muon:
                tensors[f"optim/moment2/{s.item.key}"] = self.states.moment2_view(i)
        return tensors

    @torch.no_grad()
    def masters_from_parameters(self) -> None:
        """Start the owned master weights from the parameters (a checkpoint without optimizer state)."""
        for i, slot in enumerate(self.owned):
            self.states.master_view(i).copy_(slot.data.float())

    def owned_gradients(self) -> dict[str, Tensor]:
        """The reduced gradients of the owned items (after `reduce`), by item key."""
        return {s.item.key: self._own(self.grad_region, s).clone() for s in self.owned}


def _attention_matrix(key: str) -> tuple[int | None, str | None]:
    parts = key.split(".")
    if len(parts) == 5 and parts[0] == "layers" and parts[2] == "self_attn" and parts[4] == "weight":
        return int(parts[1]), parts[3]
    return None, None


class ShardedMuonClip:
    """ZeRO-1 MuonClip over a rank's model parts: one ShardGroup for the dense parameters (EP x DP
    group) and one for its expert slice (DP group)."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], first_expert: int,
                 dense_group: dist.ProcessGroup | None, expert_group: dist.ProcessGroup | None,
                 cfg: OptimizerConfig, attention_dims: tuple[int, int, int], distributed: bool,
                 offload: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 collectives: Collectives | None = None):
        self.collectives = Collectives() if collectives is None else collectives
        dense = [(n, p) for n, p in named_params if not is_expert_param(n)]
        expert = [(n, p) for n, p in named_params if is_expert_param(n)]
        places = dict(offload=offload, chunk_bytes=chunk_bytes, collectives=self.collectives)
        self.groups = [ShardGroup(dense, first_expert, dense_group, cfg, **places),
                       ShardGroup(expert, first_expert, expert_group, cfg, **places)]
        self.cfg = cfg
        self.attention_dims = attention_dims
        self.distributed = distributed
        self.clip_coef = 1.0

    def reduce(self, divisor: float) -> None:
        for group in self.groups:
            group.accumulate_leftovers()
            group.reduce(divisor)

    def clip_(self, max_norm: float) -> float:
        """The global gradient norm (each parameter counted once, by its owner) and the clip factor
        torch.nn.utils.clip_grad_norm_ would apply (max_norm 0: none)."""
        square = sum(group.owned_square_norm() for group in self.groups)
        if self.distributed:
            self.collectives.all_reduce(square, op=dist.ReduceOp.SUM)
        norm = square.sqrt().item()
        self.clip_coef = min(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else 1.0
        return norm

    def step(self, lr: float, max_logits_LH: Tensor, layers: Sequence[int]) -> None:
        """Update the owned items, QK-Clip the owned attention masters, gather every parameter."""
        gammas = {}
        if self.cfg.qk_clip:
            gammas = {layer: qk_clip_scales(max_logits_LH[layer], self.cfg.qk_clip_tau) for layer in layers}
        for group in self.groups:
            group.update(lr, self.clip_coef, gammas, self.attention_dims)
            group.gather()

    def owned_gradients(self) -> dict[str, Tensor]:
        return {k: v for group in self.groups for k, v in group.owned_gradients().items()}

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return {k: v for group in self.groups for k, v in group.checkpoint_tensors().items()}

    @property
    def steps_taken(self) -> int:
        return self.groups[0].adam_steps

    def restore(self, steps_taken: int, with_optimizer_state: bool) -> None:
        """After a checkpoint was loaded into `checkpoint_tensors()`: the step count, and masters
        from the parameters when the checkpoint had no optimizer state."""
        for group in self.groups:
            group.adam_steps = steps_taken
            if not with_optimizer_state:
                group.masters_from_parameters()

    def optimizer_state_bytes(self) -> int:
        return sum(group.optimizer_state_bytes() for group in self.groups)

    def optimizer_state_bytes_by_place(self) -> dict[str, int]:
        """This rank's optimizer-state bytes on the device and in host memory (memory.optimizer_offload)."""
        places = [group.optimizer_state_bytes_by_place() for group in self.groups]
        return {place: sum(p[place] for p in places) for place in ("device", "host")}

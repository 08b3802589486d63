"""The PP x EP x DP rank layout as a pure function of the world size, the degrees and the rank order.

K2 trains with 16-way pipeline parallelism (interleaved 1F1B over virtual stages), 16-way expert
parallelism and ZeRO-1 data parallelism, without tensor parallelism (K2 report §2.4).
`Layout` answers every question about where a rank sits (its coordinates, its node, its groups, its
virtual stages, which slice of the batch it reads) without torch, processes or a network, so the whole
layout of a 4096-GPU job can be checked on a laptop before anything distributed exists (docs/ARCHITECTURE.md#layout).

Rank numbering follows Megatron's rank-order generator: `rank = sum(coord[axis] * stride[axis])`, with
the first axis of `order` varying fastest (stride 1). With order (EP, PP, DP) and 8 GPUs per node, an
EP group of 16 occupies two whole nodes, so its all-to-all stays on NVLink within each half.

Groups (docs/ARCHITECTURE.md#layout): dense weights of a stage are replicated over its EP x DP ranks and expert weights
over its DP ranks, so dense gradients reduce over the "dense" group and expert gradients over the
"expert_grad" group; the "expert" group runs the token all-to-all and the "pipeline" group the p2p sends.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

# LayoutError is defined beside resolve_dp, which raises it too: one error for a layout that cannot be.
from k2train.config.checks import ConfigError, LayoutError, micro_batches_per_step, resolve_dp
from k2train.config.schema import JobConfig
from k2train.config.schema import ParallelConfig


class Axis(str, enum.Enum):
    """A mesh axis of the layout ("axis" is the mesh, "dim" is a tensor's)."""

    PP = "pp"
    EP = "ep"
    DP = "dp"


# Each kind of group: the axes its members vary over, listed slowest first (which also orders them).
GROUP_AXES: dict[str, tuple[Axis, ...]] = {
    "pipeline": (Axis.PP,),
    "expert": (Axis.EP,),
    "dense": (Axis.DP, Axis.EP),
    "expert_grad": (Axis.DP,),
}
GROUP_KINDS = tuple(GROUP_AXES)


@dataclass(frozen=True)
class RankCoords:
    """A rank's coordinate on each axis: its pipeline rank, EP rank and DP rank."""

    pp: int
    ep: int
    dp: int

    def on(self, axis: Axis) -> int:
        return getattr(self, axis.value)


@dataclass(frozen=True)
class Layout:
    """world_size = pp * ep * dp ranks; `order` lists the axes fastest-varying first, e.g. (EP, PP, DP).

    Build it with `make_layout`, which also checks the model and the batch against the degrees;
    constructing it directly checks only that the numbers describe a layout.
    """

    world_size: int
    pp: int
    vp: int
    ep: int
    dp: int
    order: tuple[Axis, Axis, Axis]
    gpus_per_node: int

    def __post_init__(self) -> None:
        if not all(isinstance(a, Axis) for a in self.order) or sorted(self.order) != sorted(Axis):
            raise LayoutError(f"a layout order must list each Axis (pp, ep, dp) once, got {self.order!r}.")
        for name in ("pp", "vp", "ep", "dp", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise LayoutError(f"the layout's {name} must be at least 1, got {getattr(self, name)}.")
        if self.pp * self.ep * self.dp != self.world_size:
            raise LayoutError(
                f"pp {self.pp} x ep {self.ep} x dp {self.dp} = {self.pp * self.ep * self.dp} ranks, "
                f"but the world has {self.world_size}.")

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages of one model copy: pp * vp."""
        return self.pp * self.vp

    @property
    def sequence_ranks(self) -> int:
        """Ranks of one pipeline stage that each run their own sequences: ep * dp."""
        return self.ep * self.dp

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: pp * ep."""
        return self.pp * self.ep

    def degree(self, axis: Axis) -> int:
        return getattr(self, axis.value)

    @property
    def strides(self) -> dict[Axis, int]:
        """Rank stride of each axis: 1 for the fastest, then the product of the faster degrees."""
        strides, stride = {}, 1
        for axis in self.order:
            strides[axis] = stride
            stride *= self.degree(axis)
        return strides

    # ---- ranks and coordinates -----------------------------------------------------------------

    def coords(self, rank: int) -> RankCoords:
        """The (pp, ep, dp) coordinates of `rank`."""
        self._check_rank(rank)
        strides = self.strides
        return RankCoords(**{a.value: rank // strides[a] % self.degree(a) for a in Axis})

    def rank_of(self, coords: RankCoords) -> int:
        """The rank at `coords`; the inverse of `coords`."""
        for axis in Axis:
            if not 0 <= coords.on(axis) < self.degree(axis):
                raise LayoutError(
                    f"the {axis.value} coordinate {coords.on(axis)} is outside 0..{self.degree(axis) - 1}.")
        strides = self.strides
        return sum(coords.on(a) * strides[a] for a in Axis)

    def node_of(self, rank: int) -> int:
        """The node holding `rank`, with ranks numbered node by node (torchrun, Slurm)."""
        self._check_rank(rank)
        return rank // self.gpus_per_node

    def sequence_rank(self, rank: int) -> int:
        """Which of the ep * dp slices of the global batch `rank` reads: dp * ep_size + ep.

        All ranks of one pipeline group read the same slice (the stages of one sequence), and the
        ranks of a stage read different ones, since dense weights are replicated over EP x DP.
        """
        c = self.coords(rank)
        return c.dp * self.ep + c.ep

    def stage_indices(self, pp_rank: int) -> list[int]:
        """Virtual stages held by pipeline rank `pp_rank`: the looped placement pp_rank + k * pp.

        This is the placement torch's interleaved schedules expect (stage i on pipeline rank i % pp).
        """
        if not 0 <= pp_rank < self.pp:
            raise LayoutError(f"the pipeline rank {pp_rank} is outside 0..{self.pp - 1}.")
        return [pp_rank + k * self.pp for k in range(self.vp)]

    # ---- groups --------------------------------------------------------------------------------

    def pipeline_group(self, rank: int) -> tuple[int, ...]:
        """Ranks with the same ep and dp as `rank`, ordered by pipeline rank."""
        return self._group_of(rank, GROUP_AXES["pipeline"])

    def expert_group(self, rank: int) -> tuple[int, ...]:
        """Ranks with the same pp and dp as `rank`, ordered by EP rank: the token all-to-all."""
        return self._group_of(rank, GROUP_AXES["expert"])

    def dense_group(self, rank: int) -> tuple[int, ...]:
        """All EP x DP ranks of `rank`'s stage, ordered by (dp, ep), i.e. by sequence rank."""
        return self._group_of(rank, GROUP_AXES["dense"])

    def expert_grad_group(self, rank: int) -> tuple[int, ...]:
        """Ranks with the same pp and ep as `rank`, ordered by DP rank: replicas of its experts."""
        return self._group_of(rank, GROUP_AXES["expert_grad"])

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of `kind`, ordered by lowest rank, each ordered as its `*_group` method.

        Every rank must create process groups in the same order; this order depends on nothing but
        the layout. Cost is O(world_size).
        """
        if kind not in GROUP_AXES:
            raise ValueError(f"a group kind is one of {', '.join(GROUP_KINDS)}, got {kind!r}.")
        varying = GROUP_AXES[kind]
        fixed = [a for a in Axis if a not in varying]
        found = []
        for values in itertools.product(*(range(self.degree(a)) for a in fixed)):
            at = {a.value: 0 for a in varying} | {a.value: v for a, v in zip(fixed, values)}
            found.append(self._group_of(self.rank_of(RankCoords(**at)), varying))
        return sorted(found, key=min)

    def _group_of(self, rank: int, varying: tuple[Axis, ...]) -> tuple[int, ...]:
        """Ranks that share `rank`'s coordinates except on `varying` (listed slowest first)."""
        c = self.coords(rank)
        strides = self.strides
        base = rank - sum(c.on(a) * strides[a] for a in varying)
        steps = itertools.product(*(range(self.degree(a)) for a in varying))
        return tuple(base + sum(i * strides[a] for i, a in zip(step, varying)) for step in steps)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise LayoutError(
                f"rank {rank} is outside the world of {self.world_size} ranks (0..{self.world_size - 1}).")


def parse_rank_order(text: str) -> tuple[Axis, Axis, Axis]:
    """"ep,pp,dp" -> (Axis.EP, Axis.PP, Axis.DP); raises LayoutError unless each axis appears once."""
    names = [part.strip() for part in text.split(",")]
    if sorted(names) != sorted(a.value for a in Axis):
        raise LayoutError(
            f"parallel.rank_order must name each of ep, pp, dp once (e.g. \"ep,pp,dp\"), got {text!r}.")
    return tuple(Axis(name) for name in names)


def make_layout(world_size: int, parallel: ParallelConfig, *, num_layers: int, num_experts: int,
                micro_batches: int | None, dp: int | None = None) -> Layout:
    """The layout of `world_size` ranks under `parallel`, checked against the model and the batch.

    `micro_batches` is the number of micro-batches each sequence rank runs per optimizer step
    (`k2train.config.checks.micro_batches_per_step`); None skips the schedule rule. `dp` is the
    data-parallel degree when the caller has resolved it already (`resolve_dp`), else it is resolved here.
    Raises LayoutError with one sentence naming the numbers that do not fit.
    """
    order = parse_rank_order(parallel.rank_order)
    if parallel.gpus_per_node < 1:
        raise LayoutError(f"parallel.gpus_per_node must be at least 1, got {parallel.gpus_per_node}.")
    dp = resolve_dp(parallel, world_size) if dp is None else dp
    if num_experts % parallel.ep:
        raise LayoutError(
            f"model.num_experts ({num_experts}) must split evenly over parallel.ep ({parallel.ep}) so every "
            f"EP rank holds the same number of experts.")
    stages = parallel.pp * parallel.vp
    if num_layers < stages - 1:
        raise LayoutError(
            f"model.num_layers ({num_layers}) cannot fill parallel.pp {parallel.pp} x parallel.vp "
            f"{parallel.vp} = {stages} virtual pipeline stages; each stage but the last (which may hold "
            f"only the head) needs at least one layer.")
    if parallel.pp > 1 and micro_batches is not None:
        _check_micro_batches(micro_batches, parallel.pp)
    return Layout(world_size=world_size, pp=parallel.pp, vp=parallel.vp, ep=parallel.ep, dp=dp,
                  order=order, gpus_per_node=parallel.gpus_per_node)


def _check_micro_batches(micro_batches: int, pp: int) -> None:
    """Interleaved 1F1B runs micro-batches in rounds of pp, so it needs a whole number of rounds."""
    if micro_batches >= pp and micro_batches % pp == 0:
        return
    need = f"at least {pp} and a multiple of {pp}" if micro_batches < pp else f"a multiple of {pp}"
    raise LayoutError(
        f"train.global_batch_tokens gives {micro_batches} micro-batches per step on each sequence rank, "
        f"but the interleaved schedule over parallel.pp={pp} needs {need}.")


def config_layout(cfg: JobConfig, world_size: int, dp: int) -> Layout:
    """The layout of `cfg` on `world_size` ranks with its resolved `dp` (raises LayoutError)."""
    return make_layout(world_size, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                       micro_batches=micro_batches_per_step(cfg, dp), dp=dp)


def layout_for(cfg: JobConfig, world_size: int, source: str = "the launched world") -> Layout:
    """The validated layout of `cfg` on `world_size` ranks (raises ConfigError / LayoutError)."""
    p = cfg.parallel
    if world_size == 1 and p.pp * p.ep * (p.dp or 1) > 1:
        raise ConfigError(
            f"{cfg.name} lays out parallel.pp {p.pp} x parallel.ep {p.ep} x parallel.dp {p.dp}, which needs "
            f"{p.pp * p.ep * (p.dp or 1)} or more processes, but this is one; launch it with "
            f"`torchrun --nproc-per-node N -m k2train train ...` or set parallel.pp=1 parallel.vp=1 "
            f"parallel.ep=1 parallel.dp=1."
        )
    return config_layout(cfg, world_size, resolve_dp(p, world_size, source))

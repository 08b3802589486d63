"""Which layers each virtual pipeline stage holds: chosen by cost, not by layer count.

Every pipeline rank waits for the slowest one (K2 §2.4: interleaved 1F1B paces all ranks to the
busiest), so the split minimises the busiest rank's forward + backward time by the plan's cost
model (parallel/plan/cost.py: matrix FLOPs of attention, the dense first layer and the MoE layers,
recomputation, and the head on the last stage; the embedding is a lookup). Rank r runs the stages
r, r + pp, ... (parallel/pipeline/stages.py), so a rank's cost is the sum over its stages.

The rule is pure and deterministic: the contiguous split whose costliest stage is cheapest (exact
for one stage per rank), then, for interleaved stages, a local search that moves one layer at a time
across a stage boundary while that lowers (busiest rank, sum of squared rank costs). The runner,
`k2train plan` and `k2train layout` all call `choose_split`; `parallel.stage_layers` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence

from k2train.config.schema import JobConfig, ModelConfig
from parallel.pipeline.stage_cost import stage_train_flops


def split_layers(num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[range]:
    """The layers of each virtual stage, in stage order.

    Explicit `layers_per_stage` is used as given. Otherwise the split is as even as possible, and
    the stages that get one layer fewer are the first and the last, which also carry the embedding
    and the head.
    """
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
    else:
        base, extra = divmod(num_layers, num_stages)
        counts = [base] * num_stages
        # Extra layers go to the middle stages first, from the centre out.
        preference = sorted(range(num_stages), key=lambda s: (s in (0, num_stages - 1), abs(2 * s - num_stages + 1)))
        for s in preference[:extra]:
            counts[s] += 1
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def describe_split(split: list[range], pp: int) -> str:
    """One line per pipeline rank: its virtual stages and their layers."""
    lines = []
    for rank in range(pp):
        stages = [f"stage {s}: " + _layers_text(r)
                  + (" + head" if s == len(split) - 1 else "") for s, r in enumerate(split) if s % pp == rank]
        lines.append(f"  pp rank {rank}: " + "; ".join(stages))
    return "\n".join(lines)


def _layers_text(layers: range) -> str:
    if not layers:
        return "no layers"
    return f"layer {layers.start}" if len(layers) == 1 else f"layers {layers.start}-{layers.stop - 1}"


class SplitError(ValueError):
    """A split that cannot be made."""


def unit_costs(model: ModelConfig, seq: int, recompute: bool, fused: bool) -> tuple[list[int], int]:
    """Training FLOPs per token of each layer, and of the head (with the final norm and loss)."""
    layers = [stage_train_flops(model, seq, range(i, i + 1), False, recompute, fused) for i in range(model.num_layers)]
    return layers, stage_train_flops(model, seq, range(0), True, recompute, fused)


def rank_costs(counts: Sequence[int], pp: int, layer_costs: Sequence[int], head_cost: int) -> list[int]:
    """Each pipeline rank's cost for the layers per stage `counts` (the last stage holds the head)."""
    ranks = [0] * pp
    start = 0
    for s, count in enumerate(counts):
        ranks[s % pp] += sum(layer_costs[start:start + count])
        start += count
    ranks[(len(counts) - 1) % pp] += head_cost
    return ranks


def balance(layer_costs: Sequence[int], head_cost: int, num_stages: int, pp: int, head_only: bool = False) -> list[int]:
    """Layers per stage that minimise the busiest rank's cost.

    Every stage keeps at least one layer, except that with `head_only` the last stage may hold
    only the head (and the loss) when that balances best. With one stage per rank the least
    busiest stage is exact (`_min_max_stages`); with several, a local search polishes the best of
    that and the layer-count split.
    """
    n = len(layer_costs)
    if num_stages < 1 or pp < 1 or num_stages % pp:
        raise SplitError(f"{num_stages} pipeline stages cannot be spread over {pp} pipeline ranks; "
                         f"expected a positive multiple of the rank count.")
    floors = [1] * (num_stages - 1) + [0 if head_only else 1]
    if n < sum(floors):
        raise SplitError(f"{n} layers cannot fill {num_stages} pipeline stages; each stage needs a layer"
                         + (" (the last may hold only the head)." if head_only else "."))
    starts = [_min_max_stages(layer_costs, head_cost, floors)]
    if n >= num_stages:
        starts.append([len(r) for r in split_layers(n, num_stages)])
    return min((_local_search(c, pp, layer_costs, head_cost, floors) for c in starts),
               key=lambda c: _score(c, pp, layer_costs, head_cost))


def _score(counts: list[int], pp: int, layer_costs: Sequence[int], head_cost: int) -> tuple[int, int]:
    costs = rank_costs(counts, pp, layer_costs, head_cost)
    return max(costs), sum(x * x for x in costs)


def _min_max_stages(layer_costs: Sequence[int], head_cost: int, floors: list[int]) -> list[int]:
    """Contiguous stages of at least `floors[s]` layers whose costliest stage (the last with the
    head) is as cheap as possible: dynamic programming over (stages, layers) prefixes."""
    n, S = len(layer_costs), len(floors)
    prefix = [0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least costliest stage when stages 0..s-1 hold layers 0..i-1; cut[s][i] its last start.
    best = [[inf] * (n + 1) for _ in range(S + 1)]
    cut = [[0] * (n + 1) for _ in range(S + 1)]
    best[0][0] = 0
    for s in range(1, S + 1):
        extra = head_cost if s == S else 0
        for i in range(n + 1):
            for j in range(i - floors[s - 1] + 1):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(S, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return counts[::-1]


def _local_search(counts: list[int], pp: int, layer_costs: Sequence[int], head_cost: int,
                  floors: list[int]) -> list[int]:
    """Move one layer at a time across a stage boundary while that lowers (busiest rank, sum of
    squared rank costs)."""
    best = _score(counts, pp, layer_costs, head_cost)
    improved = True
    while improved:
        improved = False
        for s in range(len(counts) - 1):
            for give, take in ((s, s + 1), (s + 1, s)):
                if counts[give] <= floors[give]:
                    continue
                trial = list(counts)
                trial[give] -= 1
                trial[take] += 1
                trial_score = _score(trial, pp, layer_costs, head_cost)
                if trial_score < best:
                    counts, best, improved = trial, trial_score, True
    return counts


def choose_split(cfg: JobConfig, num_stages: int, pp: int) -> list[range]:
    """The layers of each virtual stage for `cfg`: `parallel.stage_layers` if given, else balanced.

    The cost model counts the attention the config's device runs (the fused kernel's causal half
    on CUDA, the eager full square on CPU) and selective recomputation as configured.
    """
    model = cfg.model
    if cfg.parallel.stage_layers is not None:
        counts = list(cfg.parallel.stage_layers)
        if len(counts) != num_stages or min(counts) < 0 or sum(counts) != model.num_layers or min(counts[:-1]) < 1:
            raise SplitError(
                f"parallel.stage_layers {counts} must give each of the {num_stages} stages at least one layer "
                f"(the last may hold only the head) and add up to model.num_layers {model.num_layers}.")
        return split_layers(model.num_layers, num_stages, counts)
    layer_costs, head_cost = unit_costs(model, cfg.data.seq_len, cfg.memory.selective_recompute,
                                        fused=cfg.parallel.device != "cpu")
    counts = balance(layer_costs, head_cost, num_stages, pp, head_only=True)
    return split_layers(model.num_layers, num_stages, counts)

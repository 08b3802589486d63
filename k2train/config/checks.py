"""Rules a loaded `JobConfig` must satisfy, and the batch arithmetic derived from it.

`validate` raises `ConfigError` at the first value that cannot run, with one sentence naming the
source (file, plus any --set overrides), the dotted keys, their values and what would fit. It never
rewrites a value. Type rules (an int where an int belongs) are the loader's job; this module sees
well-typed dataclasses and checks what their values mean together.

The batch: dense weights are replicated over the EP x DP ranks of a pipeline stage and each of
those ranks runs its own sequences (DESIGN §2), so a step's sequences are split over ep * dp ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from k2train.config.schema import JobConfig, MixtureEntry, ParallelConfig


class ConfigError(ValueError):
    """A config key, value or override that cannot run; the message names the file and the key."""


class LayoutError(ConfigError):
    """A PP x EP x DP layout that the world size and the config cannot form (parallel/layout.py);
    the message names the numbers."""


EXPERT_IMPLS = ("grouped_mm", "loop")
SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble")
OVERLAPS = ("none", "ep")
DEVICES = ("cpu", "cuda", "auto")
PARAM_DTYPES = ("float32", "bfloat16")
RANK_AXES = ("ep", "pp", "dp")

_Bound = tuple[Callable[[float], bool], str]


def _gt(bound: float) -> _Bound:
    return (lambda v: v > bound), f"greater than {bound}"


def _ge(bound: int) -> _Bound:
    return (lambda v: v >= bound), f"at least {bound}"


_UNIT: _Bound = ((lambda v: 0 <= v < 1), "in [0, 1)")

# Single-key bounds; rules that relate several keys are written out in the functions below.
_BOUNDS: tuple[tuple[str, _Bound], ...] = (
    *((f"model.{k}", _ge(1)) for k in (
        "vocab_size", "hidden_size", "num_layers", "dense_intermediate_size",
        "moe_intermediate_size", "num_experts", "experts_per_token", "num_heads", "q_lora_rank",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "max_position_embeddings")),
    *((f"model.{k}", _gt(0)) for k in (
        "rms_norm_eps", "rope_theta", "init_std", "routed_scaling_factor")),
    *((f"model.{k}", _ge(0)) for k in (
        "first_dense_layers", "num_shared_experts", "router_bias_update_rate")),
    *((f"parallel.{k}", _ge(1)) for k in ("pp", "vp", "ep", "gpus_per_node")),
    ("optimizer.lr", _gt(0)),
    ("optimizer.min_lr", _ge(0)),
    ("optimizer.weight_decay", _ge(0)),
    ("optimizer.muon_momentum", _UNIT),
    ("optimizer.ns_steps", _ge(1)),
    ("optimizer.update_rms", _gt(0)),
    ("optimizer.adam_beta1", _UNIT),
    ("optimizer.adam_beta2", _UNIT),
    ("optimizer.adam_eps", _gt(0)),
    ("optimizer.qk_clip_tau", _gt(0)),
    ("optimizer.max_grad_norm", _ge(0)),
    ("optimizer.adamw_block_elements", _ge(1)),
    *((f"optimizer.{k}", _ge(0)) for k in ("warmup_steps", "stable_steps", "decay_steps")),
    ("data.seq_len", _ge(1)),
    ("data.seed", _ge(0)),
    ("train.steps", _ge(1)),
    ("train.global_batch_tokens", _ge(1)),
    ("train.micro_batch_size", _ge(1)),
    ("train.seed", _ge(0)),
    ("train.loss_spike_factor", _ge(0)),
    ("train.eval_every", _ge(0)),
    ("train.eval_batches", _ge(1)),
    ("data.valid_fraction", _UNIT),
    ("train.max_skipped_steps", _ge(1)),
    ("memory.optimizer_chunk_mb", _gt(0)),
    ("checkpoint.every_steps", _ge(0)),
    ("checkpoint.keep_last", _ge(1)),
    ("logging.log_every", _ge(1)),
)

_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.expert_impl", EXPERT_IMPLS),
    ("parallel.schedule", SCHEDULES),
    ("parallel.overlap", OVERLAPS),
    ("parallel.device", DEVICES),
    ("train.param_dtype", PARAM_DTYPES),
    ("optimizer.ns_dtype", PARAM_DTYPES),
    ("train.on_nonfinite", ("stop", "skip")),
    ("checkpoint.resume", ("same", "changed")),
)

_NON_EMPTY = ("data.tokenizer", "logging.run_root", "logging.wandb_project")


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: JobConfig, source: str) -> None:
    """Raise ConfigError for the first value of `cfg` that cannot run; `source` names where it came from."""
    _check_finite(cfg, "", source)
    for key, (fits, expected) in _BOUNDS:
        value = _get(cfg, key)
        if not fits(value):
            raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}.")
    for key, allowed in _CHOICES:
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(allowed)}, got {value!r}.")
    for key in _NON_EMPTY:
        if not _get(cfg, key):
            raise ConfigError(f"{source}: {key} must not be empty.")
    _check_model(cfg, source)
    _check_parallel(cfg, source)
    _check_optimizer(cfg, source)
    _check_positions(cfg, source)
    _check_data(cfg, source)
    _check_offload_budget(cfg, source)
    # With dp null the world size decides dp at launch (`validate_world`); every dp >= 1 needs
    # the batch to split over the EP ranks at least, so that much is checked now.
    if cfg.parallel.dp is None:
        check_batch(cfg, 1, source, dp_note=" (the least; parallel.dp is null)")
    else:
        check_batch(cfg, cfg.parallel.dp, source)


def _check_finite(node: object, prefix: str, source: str) -> None:
    """inf passes every lower bound and NaN every `<` test, so floats must be finite first."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.", source)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}.")


def _check_model(cfg: JobConfig, source: str) -> None:
    m = cfg.model
    if m.experts_per_token > m.num_experts:
        raise ConfigError(
            f"{source}: model.experts_per_token ({m.experts_per_token}) must be at most "
            f"model.num_experts ({m.num_experts}).")
    if m.first_dense_layers > m.num_layers:
        raise ConfigError(
            f"{source}: model.first_dense_layers ({m.first_dense_layers}) must be at most "
            f"model.num_layers ({m.num_layers}).")
    if m.qk_rope_head_dim % 2:
        raise ConfigError(
            f"{source}: model.qk_rope_head_dim must be even because RoPE rotates pairs of "
            f"dimensions, got {m.qk_rope_head_dim}.")
    y = m.yarn
    if y is None:
        return
    if y.factor < 1:
        raise ConfigError(
            f"{source}: model.yarn.factor must be at least 1 since YaRN extends the context, "
            f"got {y.factor!r}.")
    if y.original_max_position_embeddings < 1:
        raise ConfigError(
            f"{source}: model.yarn.original_max_position_embeddings must be at least 1, "
            f"got {y.original_max_position_embeddings!r}.")
    if not 0 < y.beta_slow <= y.beta_fast:
        raise ConfigError(
            f"{source}: model.yarn needs 0 < beta_slow <= beta_fast, got beta_slow {y.beta_slow!r} "
            f"and beta_fast {y.beta_fast!r}.")
    if y.mscale < 0 or y.mscale_all_dim < 0:
        raise ConfigError(
            f"{source}: model.yarn.mscale and mscale_all_dim must be at least 0, got {y.mscale!r} "
            f"and {y.mscale_all_dim!r}.")


def _check_parallel(cfg: JobConfig, source: str) -> None:
    p, m = cfg.parallel, cfg.model
    if p.dp is not None and p.dp < 1:
        raise ConfigError(f"{source}: parallel.dp must be at least 1 or null, got {p.dp!r}.")
    axes = [a.strip() for a in p.rank_order.split(",")]
    if sorted(axes) != sorted(RANK_AXES):
        raise ConfigError(
            f"{source}: parallel.rank_order must name each of ep, pp, dp once (e.g. \"ep,pp,dp\"), "
            f"got {p.rank_order!r}.")
    if m.num_experts % p.ep:
        fits = [d for d in range(1, m.num_experts + 1) if m.num_experts % d == 0]
        lower = max(d for d in fits if d < p.ep)
        upper = [d for d in fits if d > p.ep]
        nearest = f"{lower} or {upper[0]}" if upper else f"{lower}"
        raise ConfigError(
            f"{source}: model.num_experts ({m.num_experts}) must split evenly over parallel.ep "
            f"({p.ep}) so every EP rank holds the same experts; the nearest ep that fits is {nearest}.")
    # The last stage may hold only the head and the loss (parallel/pipeline/split.py).
    if m.num_layers < p.pp * p.vp - 1:
        raise ConfigError(
            f"{source}: model.num_layers ({m.num_layers}) cannot fill parallel.pp {p.pp} x "
            f"parallel.vp {p.vp} = {p.pp * p.vp} pipeline stages; each stage but the last needs a layer.")
    if p.stage_layers is not None:
        counts = list(p.stage_layers)
        if (len(counts) != p.pp * p.vp or min(counts) < 0 or min(counts[:-1], default=1) < 1
                or sum(counts) != m.num_layers):
            raise ConfigError(
                f"{source}: parallel.stage_layers {counts} must give each of the parallel.pp {p.pp} x "
                f"parallel.vp {p.vp} = {p.pp * p.vp} stages at least one layer (the last may hold only the head) "
                f"and add up to model.num_layers {m.num_layers}.")


def _check_offload_budget(cfg: JobConfig, source: str) -> None:
    budget = cfg.memory.activation_offload_budget_gib
    # Without memory.activation_offload the budget has nothing to bound (everything stays).
    if budget is None or budget == "auto" or (isinstance(budget, float) and budget >= 0):
        return
    raise ConfigError(f"{source}: memory.activation_offload_budget_gib must be a number of GiB of at least 0, "
                      f"\"auto\" or null, got {budget!r}.")


def _check_optimizer(cfg: JobConfig, source: str) -> None:
    o = cfg.optimizer
    if o.min_lr > o.lr:
        raise ConfigError(
            f"{source}: optimizer.min_lr ({o.min_lr!r}) must be at most optimizer.lr ({o.lr!r}), "
            f"since the schedule decays from lr to min_lr.")


def _check_positions(cfg: JobConfig, source: str) -> None:
    m, seq_len = cfg.model, cfg.data.seq_len
    if m.yarn is None and seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"{source}: data.seq_len ({seq_len}) must be at most model.max_position_embeddings "
            f"({m.max_position_embeddings}) when model.yarn is null.")
    if m.yarn is not None:
        limit = int(m.yarn.original_max_position_embeddings * m.yarn.factor)
        if seq_len > limit:
            raise ConfigError(
                f"{source}: data.seq_len ({seq_len}) must be at most "
                f"model.yarn.original_max_position_embeddings "
                f"({m.yarn.original_max_position_embeddings}) x model.yarn.factor "
                f"({m.yarn.factor!r}) = {limit}.")


def mixture_name(entry: MixtureEntry) -> str:
    """The name a mixture dataset is shown by: its `name`, else the last component of its prefix."""
    return entry.name or entry.prefix.rstrip("/").rsplit("/", 1)[-1]


def _check_data(cfg: JobConfig, source: str) -> None:
    """A mixture replaces `prefix`; its weights are positive, its names distinct; validation needs data."""
    d = cfg.data
    if d.mixture and d.prefix:
        raise ConfigError(
            f"{source}: data.prefix ({d.prefix!r}) and data.mixture are both set; give the one dataset as a "
            f"mixture entry or drop the mixture.")
    if d.mixture and d.valid_prefix:
        raise ConfigError(
            f"{source}: data.valid_prefix ({d.valid_prefix!r}) is for the single data.prefix; give each "
            f"data.mixture entry its own valid_prefix.")
    seen: dict[str, int] = {}
    for index, entry in enumerate(d.mixture):
        where = f"data.mixture[{index}]"
        if not entry.prefix:
            raise ConfigError(f"{source}: {where} has no prefix; each mixture dataset is a .bin/.idx prefix.")
        name = mixture_name(entry)
        if not (entry.weight > 0 and math.isfinite(entry.weight)):
            raise ConfigError(
                f"{source}: {where} (dataset {name!r}) has weight {entry.weight!r}; weights must be positive "
                f"finite numbers.")
        if name in seen:
            raise ConfigError(
                f"{source}: {where} and data.mixture[{seen[name]}] are both named {name!r}; give them "
                f"distinct names (the metrics report each dataset's share by name).")
        seen[name] = index
    if cfg.train.eval_every and not d.valid_fraction:
        lacking = ([f"dataset {mixture_name(e)!r}" for e in d.mixture if not e.valid_prefix] if d.mixture
                   else ([] if d.valid_prefix else ["the dataset"]))
        if lacking:
            raise ConfigError(
                f"{source}: train.eval_every ({cfg.train.eval_every}) needs held-out data, but "
                f"{', '.join(lacking)} has no valid_prefix and data.valid_fraction is 0.")


def sequence_ranks(parallel: ParallelConfig, dp: int) -> int:
    """Ranks of one pipeline stage that each run their own sequences: ep * dp (DESIGN §2)."""
    return parallel.ep * dp


def tokens_per_micro_batch_round(cfg: JobConfig, dp: int) -> int:
    """Tokens consumed when every sequence rank runs one micro-batch."""
    return cfg.data.seq_len * cfg.train.micro_batch_size * sequence_ranks(cfg.parallel, dp)


def micro_batches_per_step(cfg: JobConfig, dp: int) -> int:
    """Micro-batches each sequence rank accumulates per optimizer step (K2: 16384 / (16 * dp))."""
    return cfg.train.global_batch_tokens // tokens_per_micro_batch_round(cfg, dp)


def check_batch(cfg: JobConfig, dp: int, source: str, dp_note: str = "") -> None:
    """Raise unless train.global_batch_tokens splits into whole micro-batches on ep * dp ranks."""
    unit = tokens_per_micro_batch_round(cfg, dp)
    total = cfg.train.global_batch_tokens
    if total % unit == 0:
        return
    lower = total // unit * unit
    nearest = f"{lower} or {lower + unit}" if lower else f"{unit}"
    raise ConfigError(
        f"{source}: train.global_batch_tokens ({total}) must be a multiple of data.seq_len "
        f"{cfg.data.seq_len} x train.micro_batch_size {cfg.train.micro_batch_size} x "
        f"parallel.ep {cfg.parallel.ep} x dp {dp}{dp_note} = {unit} tokens; the nearest valid values "
        f"are {nearest}.")


def world_problem(parallel: ParallelConfig, world_size: int) -> str | None:
    """Why `world_size` ranks cannot hold the layout (world = pp * ep * dp, DESIGN §2), or None."""
    copy = parallel.pp * parallel.ep
    if world_size < 1 or world_size % copy:
        return (f"a world of {world_size} ranks is not a multiple of parallel.pp {parallel.pp} x "
                f"parallel.ep {parallel.ep} = {copy} ranks per model copy.")
    if parallel.dp is not None and parallel.dp * copy != world_size:
        return (f"parallel.pp {parallel.pp} x parallel.ep {parallel.ep} x parallel.dp {parallel.dp} = "
                f"{parallel.dp * copy} ranks, but the world has {world_size}; set parallel.dp to "
                f"{world_size // copy} or null.")
    return None


def resolve_dp(parallel: ParallelConfig, world_size: int, source: str | None = None) -> int:
    """The data-parallel degree for `world_size` ranks: world = pp * ep * dp, parallel.dp None meaning
    whatever the world leaves (K2 §2.4). The one place dp is resolved; raises LayoutError, its
    sentence prefixed with `source` (where the config came from) when given."""
    for name in ("pp", "vp", "ep"):
        if getattr(parallel, name) < 1:
            problem = f"parallel.{name} must be at least 1, got {getattr(parallel, name)}."
            break
    else:
        problem = world_problem(parallel, world_size)
    if problem:
        raise LayoutError(f"{source}: {problem}" if source else problem)
    return world_size // (parallel.pp * parallel.ep)


def validate_world(cfg: JobConfig, world_size: int, source: str) -> int:
    """Check `cfg` against the launched world and return its dp (the launcher's half of validation)."""
    dp = resolve_dp(cfg.parallel, world_size, source)
    check_batch(cfg, dp, source)
    return dp

"""`k2train plan`'s model: per pipeline stage, the memory of one GPU, its traffic and the step time.

`make_plan(cfg, layout, hardware)` is a pure function of the config, the layout and the hardware
(nothing is allocated: the ZeRO-1 ownership is assigned on meta-device model parts). For
every pipeline rank it gives the GPU with the most memory among the stage's EP x DP ranks:
parameters, the FP32 gradient buffer, optimizer states (on the device or, with
memory.optimizer_offload, in host memory), the saved activations of the micro-batches in flight at
the schedule's peak (plan_activations.py, counted per feature), the stage boundary tensors, and
what goes to host memory; then the bytes each kind of communication moves per step and an
estimated step time and MFU (plan_time.py). plan_report.py prints it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace

from k2train.config.checks import micro_batches_per_step
from k2train.config.schema import JobConfig
from k2train.model import count_parameters
from k2train.train.flops import flops_per_token
from parallel.layout import Layout
from parallel.plan.activations import ActivationSettings, Saved, stage_offloaded, stage_saved
from parallel.plan.memory import (
    GroupBuffers, InFlight, PipelineBuffers, in_flight_peak, pipeline_buffers, schedule_ops, schedule_steps, zero1_groups)
from parallel.plan.offload import AUTO, RankOffload, budget_bytes, offloaded_keys, rank_offload
from parallel.plan.exposed_time import input_waits, paired_exposed_s
from parallel.pipeline.overlap import overlap_runs
from parallel.plan.cost import (
    Hardware, LinkTraffic, bubble, collective_seconds, link_seconds)
from parallel.pipeline.stage_cost import stage_train_flops

FEATURES = list(itertools.product((False, True), repeat=3))  # (fp8, recompute, offload)


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU (and in host memory for it) under one accounting."""

    parameters: int
    gradients: int  # the FP32 gradient buffer
    optimizer: int  # on the device: reduced gradient region, master weights, moments (or the offload ring)
    activations: int  # saved activations on the device at the schedule's peak
    boundary: int  # stage outputs (and, ideal, received inputs) of the micro-batches in flight
    pipeline: int  # receive buffers at their peak (counted as held all step), the step's token ids and labels
    optimizer_phase: int  # transients of the update: the all-gather buffers
    host_optimizer: int
    host_activations: int

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.pipeline

    @property
    def device_peak(self) -> int:
        return self.static + max(self.activations + self.boundary, self.optimizer_phase)

    @property
    def host(self) -> int:
        return self.host_optimizer + self.host_activations


@dataclass(frozen=True)
class RankPlan:
    """One pipeline rank: its stages and the GPU with the most memory among its EP x DP ranks."""

    pp: int
    stages: tuple[int, ...]
    layers: tuple[range, ...]
    dense_params: int  # elements held
    expert_params: int
    dense: GroupBuffers
    expert: GroupBuffers
    saved: dict[int, Saved]  # per stage, one micro-batch, the configured features
    features: dict[tuple[bool, bool, bool], InFlight]  # (fp8, recompute, offload) -> activation peak
    buffers: PipelineBuffers
    as_built: Memory
    ideal: Memory
    compute_s: float  # forward + backward of all micro-batches, no bubble
    traffic: tuple[LinkTraffic, ...]
    update_s: float  # reduce-scatter, all-gather and the optimizer update
    configured: tuple[bool, bool, bool]  # the config's (fp8, recompute, activation offload)
    ep_paired_exposed_s: float  # with parallel.overlap=ep, the EP all-to-all its pairs leave exposed (exposed_time.py)
    input_wait_s: float  # as built, waiting for the pipeline's inputs (exposed_time.py `input_waits`)
    offload: RankOffload | None = None  # with activation offload: its budget, keys and bytes

    @property
    def in_flight(self) -> InFlight:
        return self.features[self.configured]


@dataclass(frozen=True)
class Plan:
    cfg: JobConfig
    layout: Layout
    hardware: Hardware
    attention: str
    micro_batches: int
    ranks: tuple[RankPlan, ...]
    step_s: float
    bubble_s: float
    model_flops: int  # per step, the MFU numerator
    split: tuple[range, ...]  # the layers of every virtual stage (parallel/pipeline/split.py)
    step_built_s: float = 0.0  # the step as the runtime runs it (see `_exposed_as_built`)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.layout.world_size * self.hardware.peak_tflops * 1e12 * self.step_s)

    @property
    def mfu_built(self) -> float:
        return self.mfu * self.step_s / self.step_built_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.cfg.train.global_batch_tokens / self.step_s / self.layout.world_size


def default_attention(cfg: JobConfig) -> str:
    """The attention the model runs on the config's device: the Triton flash kernel on CUDA."""
    return "eager" if cfg.parallel.device == "cpu" else "fused"


def make_plan(cfg: JobConfig, layout: Layout, hardware: Hardware, attention: str | None = None) -> Plan:
    """The plan of `cfg` laid out as `layout` on `hardware` (see the module docstring)."""
    from parallel.pipeline.split import choose_split

    attention = attention or default_attention(cfg)
    m = micro_batches_per_step(cfg, layout.dp)
    split = choose_split(cfg, layout.num_stages, layout.pp)
    groups = zero1_groups(cfg, layout, split)
    ranks = tuple(_rank_plan(cfg, layout, hardware, attention, m, split, pp, groups[pp]) for pp in range(layout.pp))
    busiest = max(r.compute_s for r in ranks)
    bubble_s = busiest * bubble(layout.pp, layout.vp, m)
    # Overlapped traffic costs only what exceeds the rank's compute.
    exposed = max(r.compute_s + sum(max(t.seconds - r.compute_s, 0.0) for t in r.traffic if t.overlapped)
                  for r in ranks)
    step_s = exposed + bubble_s + max(r.update_s for r in ranks)
    ep_hidden = overlap_runs(cfg.parallel.overlap, layout.ep)
    step_built_s = max(_exposed_as_built(r, ep_hidden) for r in ranks) + bubble_s + max(r.update_s for r in ranks)
    model_flops = cfg.train.global_batch_tokens * flops_per_token(cfg.model, cfg.data.seq_len).training
    return Plan(cfg, layout, hardware, attention, m, ranks, step_s, bubble_s, model_flops, tuple(split), step_built_s)


def rank_plan(cfg: JobConfig, layout: Layout, hardware: Hardware, pp: int) -> RankPlan:
    """Pipeline rank `pp`'s part of `make_plan` alone (the runner's `auto` offload budget)."""
    from parallel.pipeline.split import choose_split

    split = choose_split(cfg, layout.num_stages, layout.pp)
    groups = zero1_groups(cfg, layout, split, [pp])
    return _rank_plan(cfg, layout, hardware, default_attention(cfg), micro_batches_per_step(cfg, layout.dp), split,
                      pp, groups[pp])


def _exposed_as_built(r: RankPlan, ep_hidden: bool) -> float:
    """A rank's schedule time as the runtime runs it: compute, plus what overlapped traffic exceeds
    it, plus the whole EP all-to-all unless the runtime overlaps it (parallel.overlap, see
    parallel/pipeline/overlap.py `overlap_runs`), and then what its pairs leave exposed, or what
    exceeds the compute if that is more; plus the steps' waits for their pipeline inputs
    (exposed_time.py)."""
    ep = sum(t.seconds for t in r.traffic if t.name == "EP all-to-all")
    if ep_hidden:
        ep = max(r.ep_paired_exposed_s, ep - r.compute_s)
    rest = sum(max(t.seconds - r.compute_s, 0.0) for t in r.traffic if t.overlapped and t.name != "EP all-to-all")
    return r.compute_s + ep + rest + r.input_wait_s


# Traffic that runs during the schedule, under compute (K2 §2.4); the rest runs after it.
_OVERLAPPED = ("EP all-to-all", "pipeline send/receive", "activation offload")


def budgeted_offload(cfg: JobConfig, layout: Layout, split: list[range], pp: int,
                     hardware: Hardware) -> set[tuple[int, int]]:
    """The (stage, micro-batch) keys of pipeline rank `pp` that go to host under
    memory.activation_offload_budget_gib (parallel/plan/offload.py): the runner offloads these,
    the plan counts their bytes. `auto` takes the budget from this rank's plan on `hardware`."""
    if cfg.memory.activation_offload_budget_gib == AUTO:
        offload = rank_plan(cfg, layout, hardware, pp).offload
        if offload.refusal is not None:
            raise ValueError(f"memory.activation_offload_budget_gib: auto: {offload.refusal}")
        return set(offload.keys)
    return offloaded_keys(*offload_inputs(cfg, layout, split, pp), budget_bytes(cfg.memory.activation_offload_budget_gib))


def offload_inputs(cfg: JobConfig, layout: Layout, split: list[range], pp: int,
                   attention: str | None = None) -> tuple[list, dict[int, int]]:
    """The rank's schedule ops and the bytes one micro-batch of each of its stages copies to host."""
    a = activation_settings(cfg, layout, attention or default_attention(cfg), cfg.memory.fp8_activations,
                            cfg.memory.selective_recompute)
    last = layout.num_stages - 1
    floating = {s: stage_offloaded(cfg.model, a, split[s], s == 0, s == last) for s in layout.stage_indices(pp)}
    paired = overlap_runs(cfg.parallel.overlap, layout.ep)
    return schedule_ops(layout.pp, layout.vp, micro_batches_per_step(cfg, layout.dp), pp, paired), floating


def activation_settings(cfg: JobConfig, layout: Layout, attention: str, fp8: bool, recompute: bool) -> ActivationSettings:
    """The micro-batch shape, compute dtype and features the activation model needs."""
    p = 2 if cfg.train.param_dtype == "bfloat16" else 4
    return ActivationSettings(cfg.train.micro_batch_size, cfg.data.seq_len, p, fp8, recompute, attention, layout.ep)


def _rank_plan(cfg: JobConfig, layout: Layout, hw: Hardware, attention: str, m: int, split: list[range], pp: int,
               groups: tuple[GroupBuffers, GroupBuffers]) -> RankPlan:
    stages = layout.stage_indices(pp)
    last = layout.num_stages - 1
    a = activation_settings(cfg, layout, attention, cfg.memory.fp8_activations, cfg.memory.selective_recompute)
    p, T, D = a.dtype_bytes, a.tokens, cfg.model.hidden_size
    paired = overlap_runs(cfg.parallel.overlap, layout.ep)
    steps = schedule_steps(layout.pp, layout.vp, m, pp, paired)
    ops = [(op.kind, op.stage) for step in steps for op in step]
    # (received input, output) of one micro-batch: hidden states, the token ids on stage 0, the logits on the last.
    boundary = {s: (p * T * D if s > 0 else 0, p * T * (cfg.model.vocab_size if s == last else D)) for s in stages}
    features = {}
    for fp8, recompute, offload in FEATURES:
        saved = {s: _stage_saved(cfg, replace(a, fp8=fp8, recompute=recompute), split, s, offload) for s in stages}
        features[(fp8, recompute, offload)] = in_flight_peak(ops, saved, boundary, offload, prefetch=layout.pp > 1)
    configured = (cfg.memory.fp8_activations, cfg.memory.selective_recompute, cfg.memory.activation_offload)
    saved = {s: stage_saved(cfg.model, a, split[s], s == 0, s == last) for s in stages}
    buffers = pipeline_buffers(stages, layout.num_stages, m, p * T * D, T)
    dense, expert = groups
    peak = features[configured]
    as_built, ideal = _memories(cfg, dense, expert, peak, buffers, p)
    offload = None
    if cfg.memory.activation_offload:
        # The kept micro-batches' floating-point tensors stay on the device beside the rest of the peak.
        offload = rank_offload(cfg.memory.activation_offload_budget_gib, *offload_inputs(cfg, layout, split, pp, attention),
                               hw.usable_bytes, as_built.device_peak,
                               as_built.static + as_built.activations + as_built.boundary, pp)
        peak = replace(peak, device=peak.device + offload.device_peak, host=offload.host_peak)
        as_built, ideal = _memories(cfg, dense, expert, peak, buffers, p)
    rate = hw.peak_tflops * 1e12 * hw.efficiency
    fused = attention == "fused"
    total_s = {s: T * stage_train_flops(cfg.model, a.seq, split[s], s == last, a.recompute, fused) / rate for s in stages}
    forward_s = {s: T * stage_train_flops(cfg.model, a.seq, split[s], s == last, False, fused) / 3 / rate for s in stages}
    compute_s = m * sum(total_s.values())
    exchange_s = {s: link_seconds(_exchange_bytes(cfg, layout, split[s], p), _local_fraction(layout), hw) for s in stages}
    ep_paired_exposed_s = paired_exposed_s(steps, forward_s, {s: total_s[s] - forward_s[s] for s in stages},
                                           exchange_s) if paired else 0.0
    transfer_s = link_seconds(p * T * D, 0.0 if _spans_nodes(layout)["pipeline"] else 1.0, hw)
    input_wait_s = input_waits(steps, layout.num_stages, layout.pp) * transfer_s
    traffic = _traffic(cfg, layout, hw, pp, m, split, dense, expert, compute_s, p,
                       offload.host_bytes if offload else 0)
    update_s = sum(t.seconds for t in traffic if not t.overlapped)
    return RankPlan(pp, tuple(stages), tuple(split[s] for s in stages), dense.held, expert.held, dense, expert,
                    saved, features, buffers, as_built, ideal, compute_s, traffic, update_s, configured,
                    ep_paired_exposed_s, input_wait_s, offload)


def _stage_saved(cfg: JobConfig, a: ActivationSettings, split: list[range], stage: int, offload: bool) -> Saved:
    """One micro-batch of `stage`; with offload its floating bytes are what the offloader copies."""
    last = stage == len(split) - 1
    saved = stage_saved(cfg.model, a, split[stage], stage == 0, last)
    if offload:
        saved = replace(saved, floating=stage_offloaded(cfg.model, a, split[stage], stage == 0, last))
    return saved


def _worst(group: GroupBuffers, offload: bool) -> tuple[int, int]:
    """(device, host) owner bytes of the member with the most device memory."""
    return max((group.owner_bytes(i, offload) for i in range(group.size)), key=lambda b: b[0])


def _memories(cfg: JobConfig, dense: GroupBuffers, expert: GroupBuffers, peak: InFlight, buffers: PipelineBuffers,
              p: int) -> tuple[Memory, Memory]:
    offload = cfg.memory.optimizer_offload
    params = (dense.held + expert.held) * p
    (d_dev, d_host), (e_dev, e_host) = _worst(dense, offload), _worst(expert, offload)
    as_built = Memory(
        parameters=params,
        gradients=dense.grads_bytes() + expert.grads_bytes(),
        optimizer=d_dev + e_dev,
        activations=peak.device,
        boundary=peak.outputs,
        pipeline=buffers.receive + buffers.grad_receive + buffers.batch,
        optimizer_phase=dense.gather_bytes(p, offload) + expert.gather_bytes(p, offload),
        host_optimizer=d_host + e_host,
        host_activations=peak.host,
    )
    (d_grads, d_states), (e_grads, e_states) = dense.ideal_bytes(), expert.ideal_bytes()
    states = d_states + e_states
    chunk = cfg.memory.optimizer_chunk_bytes
    # Ideal: the inputs of the micro-batches in flight are the only receive buffers.
    ideal = Memory(
        parameters=params, gradients=d_grads + e_grads,
        optimizer=2 * chunk if offload else states,
        activations=peak.device, boundary=peak.outputs + peak.inputs, pipeline=buffers.batch, optimizer_phase=0,
        host_optimizer=states if offload else 0, host_activations=peak.host,
    )
    return as_built, ideal


def _traffic(cfg: JobConfig, layout: Layout, hw: Hardware, pp: int, m: int, split: list[range],
             dense: GroupBuffers, expert: GroupBuffers, compute_s: float, p: int,
             offloaded: int) -> tuple[LinkTraffic, ...]:
    model = cfg.model
    T, D = cfg.train.micro_batch_size * cfg.data.seq_len, model.hidden_size
    stages = layout.stage_indices(pp)
    local = _local_fraction(layout)
    # The forward's exchanges and their transposes in the backward.
    ep_bytes = 2 * m * sum(_exchange_bytes(cfg, layout, split[s], p) for s in stages)
    sends = sum(m * p * T * D for s in stages if s < layout.num_stages - 1)
    sends += sum(m * p * T * D for s in stages if s > 0)
    spans = _spans_nodes(layout)
    items = [
        ("EP all-to-all", ep_bytes, link_seconds(ep_bytes, local, hw), "NVLink + network" if 0 < local < 1 else
         ("NVLink" if local == 1 else "network")),
        ("pipeline send/receive", sends, link_seconds(sends, 0.0 if spans["pipeline"] else 1.0, hw),
         "network" if spans["pipeline"] else "NVLink"),
        ("activation offload", offloaded, offloaded / (hw.pcie_gbs * 1e9), "PCIe"),
    ]
    for name, group, kind in (("dense", dense, "dense"), ("expert", expert, "expert_grad")):
        grads = group.grads_bytes()
        items.append((f"gradient reduce-scatter ({name})", grads * (group.size - 1) // group.size,
                      collective_seconds(grads, group.size, spans[kind], hw), _where(spans[kind], group.size)))
        gathered = group.size * group.region * p
        items.append((f"parameter all-gather ({name})", gathered * (group.size - 1) // group.size,
                      collective_seconds(gathered, group.size, spans[kind], hw), _where(spans[kind], group.size)))
    qk = 4 * model.num_layers * model.num_heads + 8 * (2 + model.num_moe_layers * model.num_experts) + 8
    items.append(("QK-Clip max logits, loss, loads, norm", qk, 0.0, "all ranks"))
    ns = max(dense.ns_flops) + max(expert.ns_flops)
    update = ns / (hw.peak_tflops * 1e12 * hw.efficiency)
    states = max(4 * (2 * n + a) for n, a in zip(dense.owned, dense.owned_adamw))
    states += max(4 * (2 * n + a) for n, a in zip(expert.owned, expert.owned_adamw))
    if cfg.memory.optimizer_offload:
        # Each chunk's states come in and go back while other chunks update: the slower of the two.
        update = max(update, states / (hw.pcie_gbs * 1e9))
    items.append(("optimizer update" + (" (states over PCIe)" if cfg.memory.optimizer_offload else ""),
                  states if cfg.memory.optimizer_offload else 0,
                  update, "PCIe" if cfg.memory.optimizer_offload else "device"))
    return tuple(LinkTraffic(name, int(nbytes), seconds, name in _OVERLAPPED, where, seconds <= compute_s)
                 for name, nbytes, seconds, where in items)


def _exchange_bytes(cfg: JobConfig, layout: Layout, layers: range, p: int) -> int:
    """Bytes one micro-batch's forward sends through the EP all-to-all in `layers` (its backward
    sends as many): dispatch and combine of every MoE layer; (ep-1)/ep of the rows leave the rank."""
    model = cfg.model
    moe_layers = sum(1 for i in layers if i >= model.first_dense_layers)
    rows = cfg.train.micro_batch_size * cfg.data.seq_len * model.experts_per_token
    return 2 * moe_layers * rows * model.hidden_size * p * (layout.ep - 1) // max(layout.ep, 1)


def _where(spans: bool, size: int) -> str:
    return "none (1 rank)" if size == 1 else ("network" if spans else "NVLink")


def _local_fraction(layout: Layout) -> float:
    """The share of a rank's EP peers on its own node (their all-to-all rows go over NVLink)."""
    if layout.ep == 1:
        return 1.0
    group = layout.expert_group(0)
    same = sum(layout.node_of(r) == layout.node_of(0) for r in group) - 1
    return same / (layout.ep - 1)


@functools.lru_cache(maxsize=4)  # every pipeline rank's plan asks, and a large layout's groups take a while
def _spans_nodes(layout: Layout) -> dict[str, bool]:
    """Whether any group of each kind spans nodes (its collectives then run at network speed)."""
    return {kind: any(len({layout.node_of(r) for r in g}) > 1 for g in layout.groups(kind))
            for kind in ("pipeline", "dense", "expert_grad")}


@dataclass(frozen=True)
class PaperFigures:
    """The K2 report's memory figures (§2.4) recomputed for this config and layout."""

    total_params: int
    mp_size: int  # GPUs of one model copy: pp x ep
    params_and_grads: int  # BF16 parameters + FP32 gradients of one model copy (6 bytes a parameter)
    replicated_dense: int  # extra parameters held because dense weights repeat on every EP rank
    states_per_gpu: dict[int, int]  # dp -> the largest GPU's params + grads + optimizer states, ideal


def paper_figures(plan: Plan) -> PaperFigures:
    cfg, lay = plan.cfg, plan.layout
    total, _ = count_parameters(cfg.model)
    held = sum(r.dense_params * lay.ep + r.expert_params * lay.ep for r in plan.ranks)
    by_dp = {}
    for dp in (1, 2, 4, 8, 16, 32):
        by_dp[dp] = max(6 * (r.dense_params + r.expert_params) + _states(r.dense, lay.ep * dp)
                        + _states(r.expert, dp) for r in plan.ranks)
    return PaperFigures(total, lay.model_parallel_size, 6 * total, held - total, by_dp)


def _states(group: GroupBuffers, size: int) -> int:
    """Even ZeRO-1 share of master weights and moments over `size` ranks."""
    return (group.held_muon * 8 + group.held_adamw * 12) // size

"""The text of a `Plan` (`k2train plan`, launch/plan_cli.py): one screen per group of alike pipeline ranks.

Pipeline ranks whose stages hold the same kinds and numbers of layers form a group; the group
shows its rank with the largest device peak (the earliest ranks keep the most micro-batches in
flight). Memory is in GiB; the comparison with the K2 report is in its decimal units (TB, GB).
"""

from __future__ import annotations

import textwrap

from parallel.pipeline.overlap import overlap_runs
from parallel.plan.planner import Plan, RankPlan, activation_settings, paper_figures
from parallel.plan.activations import layer_tensors, per_token
from parallel.plan.cost import GiB, assumptions


_UNIT = {"GiB": GiB, "MiB": 1 << 20, "KiB": 1 << 10}
_unit = ["GiB"]  # set per report by `describe_plan`, from the largest device peak


def _gib(n: float) -> str:
    return f"{n / _UNIT[_unit[0]]:,.2f}"


def _si(n: float) -> str:
    """Decimal bytes with a unit that fits: "3,607.8 GB", "12.3 MB"."""
    for name, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {name}"
    return f"{n:,.0f} B"


def _count(n: int) -> str:
    for name, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f}{name}"
    return f"{n:,}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def describe_plan(plan: Plan, pipeline_ranks: list[int] | None = None) -> str:
    cfg, lay, hw = plan.cfg, plan.layout, plan.hardware
    largest = max(r.as_built.device_peak for r in plan.ranks)
    _unit[0] = next((name for name, scale in _UNIT.items() if largest >= scale), "KiB")
    nodes = lay.world_size / lay.gpus_per_node
    mem = cfg.memory
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    lines = [
        f"Plan: {cfg.name} on {lay.world_size} GPUs ({nodes:g} node{'' if nodes == 1 else 's'} of {hw.name}): "
        f"pp {lay.pp} (vp {lay.vp}) x ep {lay.ep} x dp {lay.dp}",
        f"  step: {cfg.train.global_batch_tokens:,} tokens = {lay.sequence_ranks} sequence ranks x {plan.micro_batches} "
        f"micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens; {cfg.train.param_dtype} parameters",
        f"  memory features: fp8_activations {_on(mem.fp8_activations)}, selective_recompute "
        f"{_on(mem.selective_recompute)}, activation_offload {_on(mem.activation_offload)}"
        + _budget_text(mem.activation_offload_budget_gib) + ", optimizer_offload "
        f"{_on(mem.optimizer_offload)}; attention {plan.attention}",
        f"  {_unit[0]} per GPU, for the GPU with the most memory among a stage's {lay.sequence_ranks} EP x DP ranks; "
        f"usable {hw.usable_bytes / GiB:g} of {hw.gpu_memory_gib:g} GiB",
        "  as built: what parallel/zero1/optimizer.py and the pipeline stages (parallel/pipeline/buffers.py) allocate; ideal: the "
        "K2 report's accounting "
        "(even ZeRO-1 shards reduce-scattered in place, receive buffers only for micro-batches in flight)",
    ]
    for group in _groups(plan, pipeline_ranks):
        lines += [""] + _rank_lines(plan, group, tokens)
    lines += [""] + _step_lines(plan) + _offload_lines(plan) + [""] + _paper_lines(plan) + [""] + _difference_lines(plan)
    lines += ["", "Assumptions:"] + [f"  - {a}" for a in assumptions(hw, plan.attention)]
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def _wrap(line: str, width: int = 116) -> list[str]:
    """Long prose lines wrapped under their own indent (tables are narrower than `width`)."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + (2 if line.lstrip().startswith("- ") else 4))
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)


def _groups(plan: Plan, wanted: list[int] | None) -> list[list[RankPlan]]:
    """Pipeline ranks with the same layer kinds per stage, in rank order; only those in `wanted`."""
    first = plan.cfg.model.first_dense_layers

    def kind(r: RankPlan) -> tuple:
        return tuple((s == 0, s == plan.layout.num_stages - 1, sum(i < first for i in layers), len(layers))
                     for s, layers in zip(r.stages, r.layers))

    groups: dict[tuple, list[RankPlan]] = {}
    for r in plan.ranks:
        if wanted is None or r.pp in wanted:
            groups.setdefault(kind(r), []).append(r)
    return list(groups.values())


def _stage_text(plan: Plan, stage: int, layers: range) -> str:
    parts = ["embedding"] if stage == 0 else []
    if len(layers):
        parts.append(f"layer {layers.start}" if len(layers) == 1 else f"layers {layers.start}-{layers.stop - 1}")
    if stage == plan.layout.num_stages - 1:
        parts.append("head + loss")
    return f"{stage} ({', '.join(parts)})"


def _rank_lines(plan: Plan, group: list[RankPlan], tokens: int) -> list[str]:
    r = max(group, key=lambda x: x.as_built.device_peak)
    ranks = ", ".join(str(x.pp) for x in group) if len(group) <= 3 else f"{group[0].pp}-{group[-1].pp}"
    shown = f" (showing {r.pp}, the largest)" if len(group) > 1 else ""
    b, i, hw = r.as_built, r.ideal, plan.hardware
    dense, expert = r.dense, r.expert
    counts = ", ".join(f"{r.in_flight.counts[s]} of stage {s}" for s in r.stages)
    usable = hw.usable_bytes
    host_per_gpu = hw.host_memory_gib * GiB / plan.layout.gpus_per_node
    p_name = plan.cfg.train.param_dtype
    rows = [
        (f"parameters ({p_name})", b.parameters, i.parameters,
         f"dense {_count(r.dense_params)} + experts {_count(r.expert_params)} elements"),
        ("gradient buffer (fp32)", b.gradients, i.gradients,
         f"groups of {dense.size} / {expert.size}, regions {_count(dense.region)} / {_count(expert.region)}"),
        ("optimizer states on device", b.optimizer, i.optimizer,
         "offload ring of 3 chunk buffers" if plan.cfg.memory.optimizer_offload else "grad region, master, moments"),
        ("activations in flight", b.activations, i.activations, f"peak: {counts}"),
        ("stage outputs (ideal: and inputs)", b.boundary, i.boundary, "kept until the micro-batch's backward"),
        ("pipeline buffers of the step", b.pipeline, i.pipeline,
         f"peak {r.buffers.peak} of {_receives(plan, r)} receive buffers; token ids"
         if plan.layout.pp > 1 else "the step's token ids and labels"),
        ("update transients", b.optimizer_phase, i.optimizer_phase, "all-gather buffers (after the schedule)"),
    ]
    lines = [f"Pipeline rank{'s' if len(group) > 1 else ''} {ranks}{shown}: virtual stages "
             + "; ".join(_stage_text(plan, s, layers) for s, layers in zip(r.stages, r.layers)),
             f"  {_unit[0] + ' per GPU':<36}{'as built':>10}{'ideal':>10}"]
    lines += [f"  {name:<36}{_gib(x):>10}{_gib(y):>10}   {note}" for name, x, y, note in rows]
    lines.append(f"  {'peak on device':<36}{_gib(b.device_peak):>10}{_gib(i.device_peak):>10}   "
                 f"{_fit(b.device_peak, usable)} as built; {_fit(i.device_peak, usable)} ideal")
    lines.append(f"  {'host memory (optimizer + activations)':<36}{_gib(b.host):>10}{_gib(i.host):>10}   "
                 f"{_fit(b.host, host_per_gpu)} of {_gib(host_per_gpu)} (its share)")
    lines += _activation_lines(plan, r, tokens)
    lines += _traffic_lines(r)
    return lines


def _fit(peak: int, usable: int) -> str:
    return f"fits ({_gib(usable - peak)} free)" if peak <= usable else f"over by {_gib(peak - usable)}"


def _activation_lines(plan: Plan, r: RankPlan, tokens: int) -> list[str]:
    per_stage = ", ".join(f"stage {s} {_si(r.saved[s].total)} ({_si(r.saved[s].integer)} of it integer)"
                          for s in r.stages)
    lines = [f"  saved per micro-batch ({tokens:,} tokens): {per_stage}",
             f"  activation peak by feature, {_unit[0]}: fp8 recompute | no offload: device | offload: device, host"]
    for fp8, recompute in ((False, False), (True, False), (False, True), (True, True)):
        plain, off = r.features[(fp8, recompute, False)], r.features[(fp8, recompute, True)]
        mark = "  <- config" if (fp8, recompute) == r.configured[:2] else ""
        lines.append(f"    {_on(fp8):>4} {_on(recompute):>4}      | {_gib(plain.device):>10}         | "
                     f"{_gib(off.device):>8}, {_gib(off.host):>8}{mark}")
    if r.features[(True, True, False)].device > r.features[(False, True, False)].device:
        lines.append("    (fp8 with recompute keeps more than recompute alone: gate and up each keep an FP8 copy of "
                     "their input, and the recomputed SwiGLU keeps its inputs in the compute dtype)")
    moe = any(i >= plan.cfg.model.first_dense_layers for layers in r.layers for i in layers)
    a = activation_settings(plan.cfg, plan.layout, plan.attention, *r.configured[:2])
    per = ", ".join(f"{kind} {per_token(plan.cfg.model, a, kind == 'MoE') / 1e3:,.1f} kB"
                    for kind in (("dense", "MoE") if plan.cfg.model.num_moe_layers else ("dense",)))
    top = layer_tensors(plan.cfg.model, a, moe)[:5]
    lines.append(f"  saved per token per layer: {per}; largest of a{' MoE' if moe else ' dense'} layer per "
                 "micro-batch: " + ", ".join(f"{name} {_si(n)}" for name, n in top))
    return lines


def _traffic_lines(r: RankPlan) -> list[str]:
    lines = [f"  traffic per step of this GPU (compute {r.compute_s:,.3g} s):"]
    for t in r.traffic:
        state = "hidden" if t.hidden else ("exposed" if t.seconds > 0 else "")
        lines.append(f"    {t.name:<40}{_si(t.bytes_sent):>12}  {t.where:<17}{t.seconds:>10.3g} s  {state}")
    return lines


def _budget_text(setting: float | str | None) -> str:
    if setting is None:
        return ""
    return " (device budget: auto, per pipeline rank)" if setting == "auto" else f" (device budget {setting:g} GiB)"


def _offload_lines(plan: Plan) -> list[str]:
    """Per pipeline rank: the offload budget, the bytes copied to host per step, their copy time at
    the host link's rate and whether it hides under the rank's compute (K2 §2.4.3)."""
    if not plan.cfg.memory.activation_offload:
        return []
    how = "auto: what the rank's peak leaves free" if plan.cfg.memory.activation_offload_budget_gib == "auto" else \
        "one budget for every rank"
    lines = [f"Activation offload per pipeline rank ({how}; copies at {plan.hardware.pcie_gbs:g} GB/s, "
             "hidden when shorter than the rank's compute):",
             f"  {'rank':>4} {'budget ' + _unit[0]:>11} {'kept ' + _unit[0]:>9} {'to host/step':>13} {'copy s':>8} "
             f"{'compute s':>10} {'peak ' + _unit[0]:>9}  copies"]
    for r in plan.ranks:
        o, t = r.offload, next(t for t in r.traffic if t.name == "activation offload")
        state = "hidden" if t.fits_under_compute else f"exposed {t.seconds - r.compute_s:,.3g} s"
        lines.append(f"  {r.pp:>4} {_gib(o.budget):>11} {_gib(o.device_peak):>9} {_si(o.host_bytes):>13} "
                     f"{t.seconds:>8.3g} {r.compute_s:>10.3g} {_gib(r.as_built.device_peak):>9}  {state}")
    exposed = [r for r in plan.ranks if not next(t for t in r.traffic if t.name == "activation offload").fits_under_compute]
    lines.append(f"  copies hide under compute on {len(plan.ranks) - len(exposed)} of {len(plan.ranks)} pipeline ranks")
    lines += [f"  the runner refuses this config: {r.offload.refusal}" for r in plan.ranks if r.offload.refusal]
    return lines


def _step_lines(plan: Plan) -> list[str]:
    busiest = max(plan.ranks, key=lambda r: r.compute_s)
    update = max(r.update_s for r in plan.ranks)
    comm = plan.step_s - busiest.compute_s - plan.bubble_s - update
    mean = sum(r.compute_s for r in plan.ranks) / len(plan.ranks)
    split = "parallel.stage_layers" if plan.cfg.parallel.stage_layers is not None else "balanced by cost"
    return [
        f"Layers per virtual stage ({split}, parallel/pipeline/split.py): "
        + " ".join(str(len(layers)) for layers in plan.split),
        f"  pipeline-rank compute: busiest {busiest.compute_s:,.1f} s, mean {mean:,.1f} s, "
        f"busiest/mean {busiest.compute_s / mean:.3f}",
        f"Step time (estimate): {plan.step_s:,.1f} s = compute {busiest.compute_s:,.1f} s (pipeline rank "
        f"{busiest.pp}) + bubble {plan.bubble_s:,.1f} s + communication beyond compute {comm:,.1f} s "
        f"+ reduce, gather and update {update:,.1f} s",
        f"  MFU {plan.mfu:.1%} of {plan.hardware.peak_tflops:g} TFLOP/s ({plan.model_flops / 1e15:,.0f} PFLOP of model "
        f"FLOPs per step); {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
        f"  as built ({_ep_overlap_text(plan)}; pipeline inputs waited for up to "
        f"{max(r.input_wait_s for r in plan.ranks):,.1f} s): step {plan.step_built_s:,.1f} s, MFU {plan.mfu_built:.1%}",
    ]


def _paper_lines(plan: Plan) -> list[str]:
    f, lay, usable = paper_figures(plan), plan.layout, plan.hardware.usable_bytes
    fp8, recompute = plan.cfg.memory.fp8_activations, plan.cfg.memory.selective_recompute
    first = plan.ranks[0]
    states = first.ideal.parameters + first.ideal.gradients + _ideal_states(first)
    plain, offloaded = first.features[(fp8, recompute, False)], first.features[(fp8, recompute, True)]
    need = {name: peak.device + peak.outputs + peak.inputs for name, peak in (("plain", plain), ("off", offloaded))}
    kept = first.ideal.parameters + first.ideal.gradients + 2 * plan.cfg.memory.optimizer_chunk_bytes
    dp_text = ", ".join(f"dp {dp} {n / 1e9:.1f}" for dp, n in f.states_per_gpu.items())

    def on_device(r: RankPlan) -> int:
        peak = r.features[(fp8, recompute, True)]
        return (r.ideal.parameters + r.ideal.gradients + _ideal_states(r) + peak.device + peak.outputs
                + peak.inputs)

    fullest = max(plan.ranks, key=on_device)
    fullest_peak = on_device(fullest)
    return [
        "Against the K2 report (§2.4), decimal units, ideal accounting:",
        f"  parameters {f.total_params / 1e12:.3f}T; BF16 parameters + FP32 gradients {f.params_and_grads / 1e12:.2f} TB "
        f"over the {f.mp_size}-GPU model-parallel group = {f.params_and_grads / f.mp_size / 1e9:.1f} GB per GPU "
        "(paper: about 6 TB, 24 GB)",
        f"  dense weights repeat on every EP rank: +{f.replicated_dense / 1e9:.1f}B parameters held, "
        f"+{6 * f.replicated_dense / 1e12:.2f} TB = {6 * f.replicated_dense / f.mp_size / 1e9:.1f} GB per GPU on average",
        f"  all states (params, grads, optimizer) of the largest GPU by dp, GB: {dp_text} (paper: about 30 GB "
        "once data parallelism spreads the optimizer states)",
        f"  here, dp {lay.dp}: the first stage's GPU keeps {states / 1e9:.1f} GB of states, leaving "
        f"{(usable - states) / 1e9:.1f} GB of {usable / 1e9:.1f}; its activations and stage tensors at the peak need "
        f"{need['plain'] / 1e9:.1f} GB without offload ({_verdict(need['plain'], usable - states)}), "
        f"{need['off'] / 1e9:.1f} GB with activation offload ({_verdict(need['off'], usable - states)})",
        f"  with the optimizer states offloaded too it keeps {kept / 1e9:.1f} GB of states and peaks at "
        f"{(kept + need['off']) / 1e9:.1f} GB ({_verdict(kept + need['off'], usable)})",
        f"  optimizer states kept on the device, with activation offload: the fullest GPU (pipeline rank {fullest.pp}) "
        f"peaks at {fullest_peak / 1e9:.1f} GB ({_verdict(fullest_peak, usable)}); K2 offloads some optimizer states "
        "at 32 nodes",
    ]


def _difference_lines(plan: Plan) -> list[str]:
    """Where the code allocates more than the report's accounting, on the GPU with the largest peak."""
    r = max(plan.ranks, key=lambda x: x.as_built.device_peak)
    b, i = r.as_built, r.ideal
    big = max((r.dense, r.expert), key=lambda g: g.grads_bytes() - 4 * g.held)
    name, numel = big.largest_item
    lines = [f"As built vs the report's accounting (pipeline rank {r.pp}, the largest), {_unit[0]}:",
             f"  gradient buffer +{_gib(b.gradients - i.gradients)}: ZeRO-1 owns items whole, so each of a group's "
             f"{big.size} regions is padded to its largest owner's ({_count(big.region)} elements; the largest item is "
             f"{name}, {_count(numel)}) and the FP32 buffer holds all {big.size} regions",
             f"  optimizer states on device +{_gib(b.optimizer - i.optimizer)}: the reduce-scatter writes a separate FP32 "
             "region, padded like the buffer (a second copy of the owned gradients; a group of 1 reduces in place); "
             "without offload the master weights span the padded region too, with offload 3 chunk buffer sets stay"]
    if b.pipeline > i.pipeline:
        extra = b.pipeline + b.boundary - i.pipeline - i.boundary
        lines.append(f"  pipeline receive buffers +{_gib(b.pipeline - i.pipeline)} ({'+' if extra >= 0 else ''}"
                     f"{_gib(extra)} beside the ideal's stage inputs in flight): a receive buffer lives from its posted "
                     f"receive to the compute that reads it, {r.buffers.peak} at once at the peak of "
                     f"{_receives(plan, r)} per step; torch's lowering posts a receive when the sender computes, so "
                     "inputs wait ahead of their forward, and output gradients wait for their backward")
    lines.append(f"  update transients {_gib(b.optimizer_phase)}: the all-gather output of every padded region in "
                 f"{plan.cfg.train.param_dtype} (and the owner's cast), after the schedule")
    return lines


def _receives(plan: Plan, r: RankPlan) -> int:
    """Receive buffers a pipeline rank allocates per step: an input for each micro-batch of each
    stage but the first, an output gradient for each of each stage but the last."""
    last = plan.layout.num_stages - 1
    return plan.micro_batches * sum((s > 0) + (s < last) for s in r.stages)


def _verdict(need: int, room: int) -> str:
    return f"fit, {(room - need) / 1e9:.1f} GB spare" if need <= room else f"do not fit by {(need - room) / 1e9:.1f} GB"


def _ideal_states(r: RankPlan) -> int:
    (_, dense), (_, expert) = r.dense.ideal_bytes(), r.expert.ideal_bytes()
    return dense + expert


def _ep_overlap_text(plan: Plan) -> str:
    """How much of the EP all-to-all this plan's runtime hides (parallel/pipeline/overlap.py; the
    pairs' share: parallel/plan/exposed_time.py)."""
    p = plan.cfg.parallel
    if overlap_runs(p.overlap, plan.layout.ep):
        exposed = max(r.ep_paired_exposed_s for r in plan.ranks)
        return (f"EP all-to-all under the paired micro-batch, parallel.overlap=ep; up to {exposed:,.1f} s of it "
                "exposed, in the unpaired warm-up and cool-down and where a pair's compute is shorter")
    return f"EP all-to-all exposed: parallel.overlap={p.overlap}"

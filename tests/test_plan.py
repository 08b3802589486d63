"""`k2train plan` against autograd, against a real multi-process run, and against the K2 report.

- The activation model (parallel/plan/activations.py) equals the bytes `saved_bytes` counts on real
  layers for every dtype and memory-feature combination, with eager and with fused attention.
- On a PP2 x EP2 gloo world with every memory feature on, each rank's parameters, ZeRO-1 buffers,
  optimizer states (device and host), pipeline receive buffers and saved activations (by the
  runner's accounting hooks) match the plan: buffers exactly, activations within 10% per rank
  (routing is not balanced on a real step) and exactly summed over the EP group.
- k2_1t on 32 H800 nodes lands on the report's figures (§2.4).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from k2train.config.load import load_config
from k2train.config.schema import ModelConfig
from k2train.memory import saved_bytes
from k2train.memory.policy import SavePolicy
from k2train.model import K2Model, ModelPart, count_parameters
from multiproc import run_world, tiny_rank
from parallel.layout import make_layout
from parallel.pipeline.split import split_layers
from parallel.pipeline.stages import lm_loss
from parallel.plan.planner import make_plan
from parallel.plan.activations import ActivationSettings, stage_offloaded, stage_saved
from parallel.plan.memory import schedule_ops
from parallel.plan.cost import HARDWARE
from triton_interpret import run_interpreted

ROOT = Path(__file__).parents[1]
# Distinct sizes everywhere, so a term counted with the wrong dimension cannot match by accident.
SMALL = ModelConfig(num_layers=3, first_dense_layers=1, hidden_size=72, moe_intermediate_size=40,
                    dense_intermediate_size=136, num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=12, num_experts=8, experts_per_token=2, vocab_size=300)
# (layers, embedding, head): a dense layer, a MoE layer, the first stage, the last stage with the loss.
STAGES = [(range(0, 1), False, False), (range(1, 2), False, False), (range(0, 2), True, False), (range(1, 3), False, True)]


def _measured(cfg: ModelConfig, layers: range, embedding: bool, head: bool, fp8: bool, recompute: bool,
              dtype: torch.dtype, batch: int = 2, seq: int = 20) -> int:
    """saved_bytes of one stage's forward (and loss), without its input, tokens and labels."""
    policy = SavePolicy(fp8=fp8, recompute=recompute)
    model = K2Model(cfg, ModelPart(layers, embedding=embedding, head=head), seed=0, policy=policy).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen) if embedding
         else torch.randn(batch, seq, cfg.hidden_size, generator=gen).to(dtype).requires_grad_())
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    forward = (lambda t: lm_loss(model(t).output, labels)) if head else (lambda t: model(t).output)
    return saved_bytes(forward, x, exclude=[*model.parameters(), x, labels])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8,recompute", list(itertools.product((False, True), repeat=2)),
                         ids=["plain", "recompute", "fp8", "fp8+recompute"])
def test_activation_model_equals_saved_bytes(dtype, fp8, recompute, batch):
    # One sequence per micro-batch (as k2_1t runs) lets attention view v where two copy it.
    settings = ActivationSettings(batch, 20, torch.empty((), dtype=dtype).element_size(), fp8, recompute)
    for layers, embedding, head in STAGES:
        want = stage_saved(SMALL, settings, layers, embedding, head).total
        got = _measured(SMALL, layers, embedding, head, fp8, recompute, dtype, batch)
        assert got == want, (list(layers), embedding, head)


def test_fused_attention_model_equals_the_flash_kernels_saved_bytes(tmp_path_factory):
    """The Triton kernel (k2train/kernels/flash_attention.py) under the CPU interpreter, in a child."""
    measured = run_interpreted(__file__, tmp_path_factory)
    for recompute, got in measured.items():
        settings = ActivationSettings(1, 16, 4, False, recompute, "fused")
        assert got == stage_saved(SMALL, settings, range(0, 2), False, False).total, recompute


def _fused_child(out: str) -> None:
    import k2train.model.attention as attention

    attention.use_triton = lambda t: True  # the kernel serves CPU tensors under the interpreter
    torch.save({rec: _measured(SMALL, range(0, 2), False, False, False, rec, torch.float32, 1, 16)
                for rec in (False, True)}, out)


# ---- a real PP2 x EP2 world against the plan ----------------------------------------------------

FEATURES = ["memory.fp8_activations=true", "memory.selective_recompute=true", "memory.activation_offload=true",
            "memory.optimizer_offload=true"]
# The embedding and head (512 x 64) as AdamW row blocks of 32 rows, shared by the two owners of their group.
WORLD = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=2", "parallel.dp=1", "logging.wandb=false", *FEATURES,
         "optimizer.adamw_block_elements=2048"]


def measure_rank(payload: dict) -> dict:
    """One rank: build the runner, run one step's forward and backward, measure what it holds."""
    from parallel.zero1.optimizer import ShardGroup

    cfg, state, runner = tiny_rank(payload["overrides"], payload["data"], trace_schedule=True,
                                   measure_activations=True)
    runner.forward_backward()
    groups = [_group_bytes(g) for g in runner.optimizer.groups]
    # The same dense group without offload: the states stay on the device, the master padded.
    dense = [(n.split(".", 2)[2], p) for n, p in runner.model.named_parameters() if ".mlp.experts." not in n]
    groups.append(_group_bytes(ShardGroup(dense, 0, state.dense_group, cfg.optimizer, offload=False)))
    # Receive buffers live from the posted receive to the compute that reads it: the stages' log
    # saw their memory (by storage weak references) at the rank's peak.
    log = runner.receive_log
    receive, grad_receive = log.peak_bytes
    result = dict(rank=state.rank, params=sum(p.nbytes for p in runner.model.parameters()), groups=groups,
                  saved=runner.saved.bytes.total("device"), offloaded=runner.saved.bytes.total("offloaded"),
                  micro_batches=runner.micro_batches, receive=receive, grad_receive=grad_receive,
                  receive_peak=log.peak.count, trace=runner.trace)
    torch.distributed.destroy_process_group()
    return result


def _group_bytes(group) -> dict:
    states = group.states
    host = sum(t.nbytes for t in (states.master, states.moment1, states.moment2)) if states.offloaded else 0
    region = 0 if group.grad_region is group.grads else group.grad_region.nbytes  # a group of one: in place
    device = region + (sum(t.nbytes for b in states.buffers for t in b) if states.offloaded else
                                         sum(t.nbytes for t in (states.master, states.moment1, states.moment2)))
    return dict(grads=group.grads.nbytes, device=device, host=host)


def _as_the_hooks_count(cfg, layout, stage: int, split: list[range], m: int):
    """The plan's saved bytes of one micro-batch of `stage`, as the runner's hooks attribute them:
    per scope (layer, embedding, head) each storage once, so the stage's received input (kept by the
    first layer's recomputed norm) and rope's cos/sin (once per layer) count there, the embedding
    counts the whole step's token ids it views, and the loss (outside the model) does not count."""
    a = ActivationSettings(cfg.train.micro_batch_size, cfg.data.seq_len, 4, True, True, "eager", layout.ep)
    saved = stage_saved(cfg.model, a, split[stage], stage == 0, stage == len(split) - 1, loss=False)
    floating = stage_offloaded(cfg.model, a, split[stage], stage == 0, stage == len(split) - 1)
    integer = saved.integer + (8 * m * a.tokens if stage == 0 else 0)
    return floating, integer


def test_plan_matches_a_measured_pp2_ep2_world(data):
    ranks = run_world(4, "test_plan:measure_rank", dict(overrides=WORLD, data=data))
    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", WORLD)
    layout = make_layout(4, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                         micro_batches=None)
    plan = make_plan(cfg, layout, HARDWARE["h800"])
    split = split_layers(cfg.model.num_layers, layout.num_stages)
    expected_saved = {}
    for got in ranks:
        rank, m = got["rank"], got["micro_batches"]
        coords, r = layout.coords(rank), plan.ranks[layout.coords(rank).pp]
        assert got["params"] == (r.dense_params + r.expert_params) * 4
        d, e = layout.dense_group(rank).index(rank), layout.expert_grad_group(rank).index(rank)
        for measured, group, member, offload in ((got["groups"][0], r.dense, d, True),
                                                 (got["groups"][1], r.expert, e, True),
                                                 (got["groups"][2], r.dense, d, False)):
            assert measured["grads"] == group.grads_bytes()
            assert (measured["device"], measured["host"]) == group.owner_bytes(member, offload), (rank, offload)
        assert got["receive"] == r.buffers.receive and got["grad_receive"] == r.buffers.grad_receive
        assert 0 < got["receive_peak"] == r.buffers.peak < m
        assert got["trace"] == schedule_ops(layout.pp, layout.vp, m, coords.pp)
        floating, integer = map(sum, zip(*(_as_the_hooks_count(cfg, layout, s, split, m) for s in r.stages)))
        expected_saved[rank] = (floating, integer)
        # Per rank the routed rows follow the router; the plan assumes balance.
        assert got["offloaded"] / m == pytest.approx(floating, rel=0.1), rank
        assert got["saved"] / m == pytest.approx(integer, rel=0.1), rank
    for group in layout.groups("expert"):
        # Over an EP group every routed row is counted once: exact.
        assert sum(ranks[i]["offloaded"] for i in group) == ranks[0]["micro_batches"] * sum(
            expected_saved[i][0] for i in group)
        assert sum(ranks[i]["saved"] for i in group) == ranks[0]["micro_batches"] * sum(
            expected_saved[i][1] for i in group)


# ---- k2_1t against the K2 report ---------------------------------------------------------------


@pytest.fixture(scope="module")
def k2_plan():
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml")
    layout = make_layout(256, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                         micro_batches=None)
    return make_plan(cfg, layout, HARDWARE["h800"])


def test_k2_1t_memory_lands_on_the_reports_figures():
    from parallel.plan.planner import paper_figures

    # The report's figures are for layer-count stages; the cost-balanced split (parallel/pipeline/split.py)
    # gives the embedding's rank two more layers and so about 3 GB more states.
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml")
    even = [len(r) for r in split_layers(cfg.model.num_layers, 32)]
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml", [f"parallel.stage_layers=[{','.join(map(str, even))}]"])
    layout = make_layout(256, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                         micro_batches=None)
    k2_plan = make_plan(cfg, layout, HARDWARE["h800"])
    f = paper_figures(k2_plan)
    total, _ = count_parameters(cfg.model)
    assert f.mp_size == 256 and 1.02e12 < total < 1.04e12
    # BF16 parameters and FP32 gradients: about 6 TB over 256 GPUs, about 24 GB each.
    assert 6.0e12 < f.params_and_grads < 6.3e12
    assert 23.5e9 < f.params_and_grads / 256 < 24.5e9
    # Dense weights are held by all 16 EP ranks of their stage: 15 extra copies of the non-expert part.
    routed = cfg.model.num_moe_layers * cfg.model.num_experts * 3 * cfg.model.hidden_size * cfg.model.moe_intermediate_size
    assert sum(r.dense_params for r in k2_plan.ranks) == total - routed
    assert 16 * sum(r.expert_params for r in k2_plan.ranks) == routed
    assert f.replicated_dense == 15 * (total - routed)
    # All states of the largest GPU: about 30 GB once dp spreads the optimizer states, twice that at dp 1.
    assert 28e9 < f.states_per_gpu[16] < 32e9 and 29e9 < f.states_per_gpu[32] <= f.states_per_gpu[16]
    assert f.states_per_gpu[1] > 55e9


def test_k2_1t_needs_offload_at_32_nodes(k2_plan):
    """At dp 1 the first stage's activations do not fit beside the states; K2's offloads make it fit."""
    first, usable = k2_plan.ranks[0], k2_plan.hardware.usable_bytes
    ideal = first.ideal
    states = ideal.parameters + ideal.gradients + sum(g.ideal_bytes()[1] for g in (first.dense, first.expert))
    on_device = first.features[(True, True, False)]
    assert states + on_device.device + on_device.outputs + on_device.inputs > usable
    assert ideal.device_peak <= usable  # the config: fp8, recomputation, activation and optimizer offload
    assert first.in_flight.host > 0 and ideal.host_optimizer > 0


def test_auto_offload_budget_is_per_rank_and_fits_every_gpu(k2_plan):
    """memory.activation_offload_budget_gib: auto gives each pipeline rank the room its peak leaves;
    a number is one budget for every rank."""
    from parallel.plan.offload import GiB, auto_budget

    usable = k2_plan.hardware.usable_bytes
    assert k2_plan.cfg.memory.activation_offload_budget_gib == "auto"
    for r in k2_plan.ranks:
        o = r.offload
        assert o.auto and 0 < o.device_peak <= o.budget and r.as_built.device_peak <= usable, r.pp
        # The budget is exactly what is left beside the peak without it.
        without = r.as_built.device_peak - o.device_peak
        assert o.budget == auto_budget(usable, without, without, r.pp)
    assert len({r.offload.budget for r in k2_plan.ranks}) > 8
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml", ["memory.activation_offload_budget_gib=16"])
    fixed = make_plan(cfg, k2_plan.layout, HARDWARE["h800"])
    assert {r.offload.budget for r in fixed.ranks} == {16 * GiB}
    # More room kept on the device: less to host on every rank.
    assert all(a.offload.host_bytes <= f.offload.host_bytes for a, f in zip(k2_plan.ranks, fixed.ranks))


def test_auto_offload_budget_refuses_a_device_too_small_for_any(capsys):
    """The runner refuses a rank that does not fit even offloading everything; the plan shows it."""
    import dataclasses

    from launch.cli import main
    from parallel.plan.planner import budgeted_offload

    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", ["memory.activation_offload=true",
                                                          "memory.activation_offload_budget_gib=auto"])
    layout = make_layout(8, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                         micro_batches=None)
    tiny_gpu = dataclasses.replace(HARDWARE["h800"], gpu_memory_gib=3.001)
    sentence = (r"pipeline rank 0 peaks at [0-9.]+ MiB with every saved activation offloaded, over the 1.02 MiB of "
                r"device memory it may use.")
    with pytest.raises(ValueError, match=r"^memory.activation_offload_budget_gib: auto: " + sentence + "$"):
        budgeted_offload(cfg, layout, split_layers(cfg.model.num_layers, layout.num_stages), 0, tiny_gpu)
    plan = make_plan(cfg, layout, tiny_gpu)
    assert plan.ranks[0].offload.budget == 0 and plan.ranks[0].as_built.device_peak > tiny_gpu.usable_bytes
    assert main(["plan", "--config", str(ROOT / "configs" / "k2_tiny.yaml"), "--world-size", "8", "--set",
                 "memory.activation_offload=true", "--set", "memory.activation_offload_budget_gib=auto",
                 "--gpu-memory-gib", "3.001"]) == 0
    assert "the runner refuses this config: pipeline rank 0 peaks at" in capsys.readouterr().out


def test_interleaved_peak_in_flight_is_the_warmup_plus_one(k2_plan):
    """Rank 0 of interleaved 1F1B keeps (p - 1) * 2 + (v - 1) * p + 1 micro-batch stages in flight."""
    pp, vp = k2_plan.layout.pp, k2_plan.layout.vp
    counts = k2_plan.ranks[0].features[(False, False, False)].counts
    assert sum(counts.values()) == (pp - 1) * 2 + (vp - 1) * pp + 1
    assert counts == {0: 2 * (pp - 1) + 1, pp: pp}


def test_plan_command_prints_tiny_and_k2_1t(capsys):
    from launch.cli import main

    assert main(["plan", "--config", str(ROOT / "configs" / "k2_tiny.yaml"), "--world-size", "8"]) == 0
    tiny = capsys.readouterr().out
    assert "Pipeline rank 0: virtual stages 0 (embedding, layer 0)" in tiny and "Step time (estimate)" in tiny
    assert main(["plan", "--config", str(ROOT / "configs" / "k2_1t.yaml"), "--nodes", "32", "--hardware", "h200",
                 "--ranks", "0"]) == 0
    k2 = capsys.readouterr().out
    assert "H200 SXM" in k2 and "Against the K2 report" in k2 and "Pipeline ranks 1-13" not in k2
    assert main(["plan", "--config", str(ROOT / "configs" / "k2_tiny.yaml"), "--world-size", "8",
                 "--pcie-gbs", "0"]) == 2
    assert "--pcie-gbs must be positive, got 0.0" in capsys.readouterr().err


if __name__ == "__main__":
    _fused_child(sys.argv[1])


def test_ep_all_to_all_is_hidden_as_built_only_where_the_runtime_overlaps_it(k2_plan):
    """K2 §2.4's overlap: without parallel.overlap each exchange blocks its micro-batch, so as built the
    step pays all of it; with overlap=ep and the interleaved 1F1B it hides but for what the pairs
    leave exposed (the warm-up and cool-down of 1024 micro-batches: a few percent of it; as built
    each step also waits for its pipeline input, overlap or not), at the
    price of one more micro-batch in flight (the extra warm-up forward)."""
    import dataclasses

    cfg = k2_plan.cfg
    assert cfg.parallel.overlap == "none" and cfg.parallel.schedule == "interleaved_1f1b"
    ep_s = max(t.seconds for r in k2_plan.ranks for t in r.traffic if t.name == "EP all-to-all")
    assert k2_plan.step_built_s > k2_plan.step_s + 0.5 * ep_s
    on = make_plan(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, overlap="ep")),
                   k2_plan.layout, HARDWARE["h800"])
    assert on.step_s == pytest.approx(k2_plan.step_s)
    exposed = max(r.ep_paired_exposed_s for r in on.ranks)
    assert 0 < exposed < 0.1 * ep_s
    waits = max(r.input_wait_s for r in on.ranks)
    assert on.step_s < on.step_built_s <= on.step_s + exposed + waits + 1e-9
    for before, after in zip(k2_plan.ranks, on.ranks):
        assert after.as_built.device_peak > before.as_built.device_peak


def test_paired_exposure_is_what_neither_task_of_a_pair_hides():
    """parallel/plan/exposed_time.py against a direct count of pp=1's paired order over 3 micro-batches:
    F0 alone, (F1, B0), (F2, B1), B2 alone. Forward 1 s, backward 2 s, exchanges 1.5 s each way: the
    lone forward and backward wait 1.5 s each; in a pair the forward's exchanges hide under the
    backward's 2 s, the backward's exceed the forward's 1 s by 0.5 s."""
    from parallel.pipeline.schedule_table import paired_order
    from parallel.plan.exposed_time import paired_exposed_s

    steps = paired_order(1, 1, 3, 0)
    assert paired_exposed_s(steps, {0: 1.0}, {0: 2.0}, {0: 1.5}) == pytest.approx(1.5 + 0.5 + 0.5 + 1.5)
    assert paired_exposed_s(steps, {0: 1.0}, {0: 2.0}, {0: 0.5}) == pytest.approx(0.5 + 0.5)


def test_input_waits_count_the_steps_that_receive_from_another_rank():
    """parallel/plan/exposed_time.py against the orders written out. pp=2, 2 micro-batches, plain:
    rank 0 (stage 0) runs F F B B and only its backwards receive; rank 1 (the last stage) runs
    F B F B and only its forwards receive. Paired over 4 micro-batches, rank 0 runs F F F (F3, B0)
    B B B: four steps with a backward; rank 1 runs F (F1, B0) (F2, B1) (F3, B2) B: four with a
    forward. One pipeline rank receives nothing."""
    from parallel.plan.exposed_time import input_waits
    from parallel.plan.memory import schedule_steps

    assert [input_waits(schedule_steps(2, 1, 2, rank, paired=False), 2, 2) for rank in (0, 1)] == [2, 2]
    assert [input_waits(schedule_steps(2, 1, 4, rank, paired=True), 2, 2) for rank in (0, 1)] == [4, 4]
    assert input_waits(schedule_steps(1, 1, 4, 0, paired=True), 1, 1) == 0

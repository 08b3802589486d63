"""memory.activation_offload and the saved-bytes accounting: exact gradients, exact byte counts,
fetches in the schedule's backward order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2train.config.schema import ModelConfig
from k2train.memory import saved_bytes
from k2train.memory.offload import ActivationOffloader
from k2train.memory.policy import SavePolicy
from k2train.memory.saved import DEVICE, OFFLOADED, SavedActivations
from k2train.model import K2Model
from k2train.model.rope import rope_cos_sin
from multiproc import run_world

ROOT = Path(__file__).parents[1]
CFG = ModelConfig(num_layers=3, first_dense_layers=1, hidden_size=128, moe_intermediate_size=64,
                  dense_intermediate_size=256)
FEATURES = [(False, False), (True, False), (False, True), (True, True)]  # (fp8, recompute)


def _model(fp8: bool, recompute: bool) -> K2Model:
    return K2Model(CFG, seed=1, policy=SavePolicy(fp8=fp8, recompute=recompute))


def _train_pass(model: K2Model, tokens: torch.Tensor, offload: bool, micro_batches: int = 2):
    """Forward and backward of `micro_batches` micro-batches under the saved-tensor hooks."""
    offloader = ActivationOffloader(torch.device("cpu")) if offload else None
    saved = SavedActivations([model], offloader)
    if offloader is not None:
        offloader.expect([(0, m) for m in range(micro_batches)])
    for m, x in enumerate(tokens.chunk(micro_batches)):
        with saved.record((0, m), tokens=x.numel()):
            out = model(x).output
        saved.mark_backward_start(out, (0, m)).float().square().mean().backward()
    saved.close()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, saved, offloader


@pytest.mark.parametrize("fp8,recompute", FEATURES)
def test_offload_gives_the_same_gradients_bit_for_bit(fp8, recompute):
    tokens = torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    kept, kept_saved, _ = _train_pass(_model(fp8, recompute), tokens, offload=False)
    moved, moved_saved, offloader = _train_pass(_model(fp8, recompute), tokens, offload=True)
    for name, grad in kept.items():
        assert torch.equal(grad, moved[name]), name
    assert offloader.late_fetches == 0 and offloader.fetched_groups == [(0, 0), (0, 1)]
    # Offloading moves bytes between places and never changes what is saved.
    plain, off = kept_saved.bytes.by_scope, moved_saved.bytes.by_scope
    assert plain.keys() == off.keys()
    for scope in plain:
        assert plain[scope][OFFLOADED] == 0
        assert off[scope][DEVICE] + off[scope][OFFLOADED] == plain[scope][DEVICE], scope
    # What stays is integer bookkeeping (token ids, routing indices): a few bytes per token, under 2%
    # of what moves even with both features on, which save the least floating-point bytes.
    assert moved_saved.bytes.total(DEVICE) < 0.02 * moved_saved.bytes.total(OFFLOADED)


@pytest.mark.parametrize("fp8,recompute", FEATURES)
def test_layer_accounting_equals_the_bytes_autograd_saves_for_that_layer(fp8, recompute):
    model = _model(fp8, recompute)
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    saved = SavedActivations([model])
    with saved.record("mb", tokens=tokens.numel()):
        model(tokens)
    saved.close()
    live = [*model.parameters(), *model.buffers()]
    x_BSD = torch.randn(2, 32, CFG.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(model.rope_inv_freq, model.rope_attention_factor, 32, x_BSD.dtype)
    per_token = saved.bytes.per_token()
    assert list(per_token) == ["embedding", "layers.0", "layers.1", "layers.2", "head"]
    for i, block in model.layers.items():
        # The block alone, fed its own leaf input and rope tables: the same saved tensors.
        want = saved_bytes(lambda x: block(x, cos, sin), x_BSD, exclude=live)
        # The rope tables are made outside the layers; a lone block saves them like the model does.
        assert saved.bytes.by_scope[f"layers.{i}"][DEVICE] == want, i
    assert per_token["embedding"][DEVICE] == 8  # the int64 token ids


def _run_steps(payload: dict) -> dict:
    """On one rank: two optimizer steps with activation offload off, then (same groups) on."""
    from k2train.config.load import load_config
    from k2train.train.loop import open_sampler
    from parallel.startup import rank_runner, start_rank
    from launch.env import launch_env

    env = launch_env()
    runs = {}
    extra = {"false": ["memory.activation_offload=false"], "true": ["memory.activation_offload=true"]}
    if payload.get("budget") is not None:
        extra["budget"] = ["memory.activation_offload=true",
                           f"memory.activation_offload_budget_gib={payload['budget']!r}"]
    if payload.get("hardware") is not None:
        # `auto` plans for the device's memory (parallel/plan/cost.py device_hardware): a CPU has
        # none to speak of, so the test lends it a GPU small enough to offload some micro-batches.
        import parallel.parallelize

        parallel.parallelize.device_hardware = lambda device: payload["hardware"]
        extra["auto"] = ["memory.activation_offload=true", "memory.activation_offload_budget_gib=auto"]
    for flag, flag_overrides in extra.items():
        cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", payload["overrides"] + flag_overrides)
        if flag == "false":
            state = start_rank(cfg, env)
        runner = rank_runner(cfg, state, open_sampler(cfg, payload["data"]))
        losses, orders, host = [], [], []
        for _ in range(2):
            result = runner.forward_backward()
            runner.clip_gradients(cfg.optimizer.max_grad_norm)
            runner.optimizer_step(1e-2, result.max_logits_LH)
            losses.append(result.loss)
            if runner.offloader is not None:
                orders.append((list(runner.offloader.fetched_groups), runner.backward_order(),
                               runner.offloader.late_fetches))
                host.append(dict(runner.offloader.host_bytes_by_key))
        runs[flag] = dict(losses=losses, orders=orders, host=host, pp=state.coords.pp, keys=runner.offload_keys,
                          params={n: p.detach().clone() for n, p in runner.model.named_parameters()})
    torch.distributed.destroy_process_group()
    return runs


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zero_bubble"])
def test_pipeline_offload_matches_no_offload_and_fetches_in_schedule_order(schedule, tmp_path):
    from k2train.data.prepare import prepare_dataset
    import json

    data = tmp_path / "json"
    prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), data, "byte")
    base = ["model.num_layers=4", "model.num_experts=8", "data.seq_len=16", "train.micro_batch_size=1",
            "train.global_batch_tokens=128", "parallel.pp=2", "parallel.vp=2", "parallel.ep=1", "parallel.dp=1",
            f"parallel.schedule={schedule}", "memory.fp8_activations=true", "memory.selective_recompute=true"]
    for rank in run_world(2, "test_offload:_run_steps", dict(overrides=base, data=str(data))):
        off, on = rank["false"], rank["true"]
        assert off["losses"] == on["losses"]
        for name, param in off["params"].items():
            assert torch.equal(param, on["params"][name]), name
        assert len(on["orders"]) == 2
        for fetched, order, late in on["orders"]:
            # Every micro-batch's activations came back once, in the rank's backward order, each
            # fetch issued before its backward needed it (one ahead, or at its backward's start).
            assert fetched == order and late == 0
            assert len(order) == 2 * 8  # 2 virtual stages x 8 micro-batches


def test_budgeted_offload_moves_only_what_exceeds_the_budget(tmp_path):
    """Under memory.activation_offload_budget_gib only the micro-batches whose backward comes last
    go to host: the same bits as no offload, each rank copies exactly the micro-batches the plan
    chose (parallel/plan/offload.py), and the bytes it copies per step are the plan's, per rank,
    with a budget, with `auto` (a budget per pipeline rank) and without (FP32, one sequence per
    micro-batch)."""
    from k2train.data.prepare import prepare_dataset
    import dataclasses

    from k2train.config.load import load_config
    from parallel.plan.offload import GiB, offloaded_keys
    from parallel.plan.planner import make_plan, offload_inputs
    from parallel.plan.cost import HARDWARE
    from parallel.pipeline.split import choose_split
    from parallel.layout import layout_for
    import json

    data = tmp_path / "json"
    prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), data, "byte")
    base = ["model.num_layers=4", "model.num_experts=8", "data.seq_len=16", "train.micro_batch_size=1",
            "train.global_batch_tokens=128", "parallel.pp=2", "parallel.vp=2", "parallel.ep=1", "parallel.dp=1"]
    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", base + ["memory.activation_offload=true"])
    layout = layout_for(cfg, 2)
    split = choose_split(cfg, layout.num_stages, layout.pp)
    micro_batch = max(offload_inputs(cfg, layout, split, 0)[1].values())
    budget = 3 * micro_batch / GiB  # about 3 micro-batches
    budgeted_cfg, auto_cfg = (load_config(ROOT / "configs" / "k2_tiny.yaml", base + [
        "memory.activation_offload=true", f"memory.activation_offload_budget_gib={b}"]) for b in (repr(budget), "auto"))
    # A GPU with room for about 2 micro-batches beside the fuller rank's schedule peak without them:
    # that rank offloads some, the other (its peak lower by more than its whole schedule) none.
    fullest = max(b.static + b.activations + b.boundary
                  for b in (r.as_built for r in make_plan(cfg, layout, HARDWARE["h800"]).ranks))
    small = dataclasses.replace(HARDWARE["h800"], gpu_memory_gib=3.0 + (fullest + 2 * micro_batch) / GiB)
    plans = {name: make_plan(c, layout, HARDWARE["h800"] if name != "auto" else small).ranks
             for name, c in (("true", cfg), ("budget", budgeted_cfg), ("auto", auto_cfg))}
    planned_host = {name: [next(t.bytes_sent for t in r.traffic if t.name == "activation offload") for r in ranks]
                    for name, ranks in plans.items()}
    assert [0 < len(r.offload.keys) < 2 * 8 for r in plans["auto"]] == [False, True]
    payload = dict(overrides=base, data=str(data), budget=budget, hardware=small)
    for rank in run_world(2, "test_offload:_run_steps", payload):
        off, on, budgeted, auto = rank["false"], rank["true"], rank["budget"], rank["auto"]
        for run in (budgeted, auto):
            assert off["losses"] == run["losses"]
            for name, param in off["params"].items():
                assert torch.equal(param, run["params"][name]), name
        assert auto["keys"] == plans["auto"][auto["pp"]].offload.keys
        ops, floating = offload_inputs(cfg, layout, split, budgeted["pp"])
        planned = offloaded_keys(ops, floating, int(budget * GiB))
        assert budgeted["keys"] == planned and 0 < len(planned) < len(on["host"][0])
        for step in range(2):
            assert budgeted["host"][step] == {k: on["host"][step][k] for k in planned}
            # Each micro-batch copies the plan's bytes of its stage; the step, the plan's traffic.
            assert on["host"][step] == {k: floating[k[0]] for k in on["host"][step]}
            for name in ("true", "budget", "auto"):
                assert sum(rank[name]["host"][step].values()) == planned_host[name][budgeted["pp"]], name
        for fetched, order, late in budgeted["orders"]:
            assert fetched == [k for k in order if k in planned] and late == 0


def test_the_budget_keeps_the_soonest_backwards_on_the_device():
    from parallel.plan.offload import offloaded_keys

    # One stage, forwards 0-3 then backwards 0-3: with room for two, the two needed last go to host.
    ops = [("F", 0)] * 4 + [("B", 0)] * 4
    assert offloaded_keys(ops, {0: 10}, 20) == {(0, 2), (0, 3)}
    assert offloaded_keys(ops, {0: 10}, 0) == {(0, m) for m in range(4)}
    assert offloaded_keys(ops, {0: 10}, 40) == set()
    # 1F1B: the device never holds more than the budget.
    ops = [("F", 0), ("F", 0), ("B", 0), ("F", 0), ("B", 0), ("B", 0)]
    assert offloaded_keys(ops, {0: 10}, 10) == {(0, 1)}


def test_auto_budget_is_the_room_the_peak_leaves_and_levels_follow_the_schedule():
    from parallel.plan.offload import auto_budget, offload_levels

    # The budget joins the schedule's peak (60 of 100 here); the update's 70 comes after it.
    assert auto_budget(100, 70, 60, 3) == 40
    with pytest.raises(ValueError, match=r"^pipeline rank 3 peaks at .* with every saved activation offloaded, over "):
        auto_budget(100, 101, 60, 3)
    ops = [("F", 0)] * 4 + [("B", 0)] * 4
    assert offload_levels(ops, {0: 10}, {(0, 2), (0, 3)}) == (20, 20)
    assert offload_levels(ops, {0: 10}, set()) == (40, 0)

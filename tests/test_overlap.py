"""Communication overlap (parallel/pipeline/overlap.py): the paired order is a valid schedule, layouts it
cannot run are refused, and on gloo the overlapped step gives bit for bit the plain step's losses,
max logits, expert loads and reduced gradients (backwards keep their order, so every addition does).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from multiproc import run_world
from parallel.pipeline.overlap import Turns, check_overlap, overlap_runs
from parallel.pipeline.schedule_table import paired_order, paired_timeline, rank_order
from test_parallel_training import BASE, STEPS, layout_overrides, plain_run


@pytest.mark.parametrize("pp,vp,microbatches", [(1, 1, 1), (1, 1, 5), (2, 1, 4), (2, 2, 4), (4, 2, 8), (16, 2, 32)])
def test_paired_order_is_a_valid_schedule(pp, vp, microbatches):
    lines = paired_timeline(pp, vp, microbatches)  # raises if the ranks' pairs wait on each other for ever
    for rank in range(pp):
        steps = paired_order(pp, vp, microbatches, rank)
        assert all(len(step) in (1, 2) for step in steps)
        assert all([op.kind for op in step] == ["F", "B"] for step in steps if len(step) == 2)
        # Every forward and backward once, each kind in the order of the plain interleaved 1F1B.
        flat = [op for step in steps for op in step]
        plain = rank_order(pp, vp, microbatches, rank)
        assert sorted(flat) == sorted(plain)
        for kind in "FB":
            assert [op for op in flat if op.kind == kind] == [op for op in plain if op.kind == kind]
        assert [step for step in lines[rank] if step is not None] == steps
    # The steady state is pairs: with pp = 1, all but the first forward and the last backward.
    if pp == 1:
        assert sum(len(step) == 2 for step in paired_order(1, 1, microbatches, 0)) == microbatches - 1


def test_turns_alternate_at_every_hand_over_and_run_one_task_at_a_time():
    turns, log, running = Turns(), [], []

    def task(name: str, steps: int):
        def run():
            for i in range(steps):
                running.append(name)
                assert running == [name]  # the other task is waiting, never running beside this one
                log.append(f"{name}{i}")
                running.pop()
                turns.hand_over()
            return name
        return run

    assert turns.run_pair(task("F", 3), task("B", 5)) == "F"
    # Strict alternation while both live; the longer task then runs on alone.
    assert log == ["F0", "B0", "F1", "B1", "F2", "B2", "B3", "B4"]
    turns.hand_over()  # outside a pair: returns at once
    turns.close()


def test_a_task_whose_input_is_still_on_the_wire_lets_the_other_run_first():
    class Receive:  # a posted receive: pending until the other task has run
        def __init__(self, done):
            self.done, self.waited = done, False

        def is_completed(self):
            return self.done()

        def wait(self):
            self.waited = True

    turns, log = Turns(), []
    late = Receive(lambda: "B" in log)
    ready = Receive(lambda: True)

    def forward():
        turns.wait_for([late])
        log.append(("F", turns.paired()))

    def backward():
        turns.wait_for([ready])  # already here: keeps the turn
        log.append(("B", turns.paired()))

    assert not turns.paired()
    turns.run_pair(forward, backward)
    # the backward ran while the forward waited; the forward then ran with its pair ended
    assert log == [("B", True), ("F", False)] and late.waited and ready.waited
    assert turns.hand_overs == 1 and not turns.paired()
    turns.close()


class GlooReceive:
    """A posted receive as gloo's work behaves: it reports completion only once waited on."""

    def __init__(self, arrived: bool, error: Exception | None = None):
        self.arrived, self.error, self.waited = threading.Event(), error, False
        if arrived:
            self.arrived.set()

    def is_completed(self):
        return self.waited

    def wait(self):
        self.arrived.wait()
        if self.error is not None:
            raise self.error
        self.waited = True


@pytest.mark.parametrize("watch", [True, False], ids=["watched", "unwatched"])
def test_a_receive_that_has_arrived_keeps_the_turn_only_when_watched(watch):
    turns, log = Turns(watch_receives=watch), []
    receive = turns.watch([GlooReceive(arrived=True)])
    while watch and not receive[0].is_completed():  # its watcher has not run yet
        time.sleep(0.001)

    def forward():
        turns.hand_over()  # its exchange issued
        log.append("F")

    def backward():
        turns.wait_for(receive)
        log.append("B")

    turns.run_pair(forward, backward)
    # watched, the backward sees its input is there and computes under the forward's exchange;
    # unwatched, gloo's answer sends the turn straight back to the forward, which waits uncovered
    assert (log, turns.hand_overs) == ((["B", "F"], 1) if watch else (["F", "B"], 2))
    turns.close()


def test_a_watched_receive_still_on_the_wire_hands_the_turn_over_and_raises_its_error():
    turns = Turns(watch_receives=True)
    pending = GlooReceive(arrived=False)
    receive = turns.watch([pending])
    log = []

    def forward():
        log.append("F")
        pending.arrived.set()  # arrives while the other task computes

    def backward():
        turns.wait_for(receive)
        log.append("B")

    turns.run_pair(backward, forward)
    assert log == ["F", "B"] and turns.hand_overs == 1 and pending.waited
    failed = turns.watch([GlooReceive(arrived=True, error=RuntimeError("peer gone"))])
    with pytest.raises(RuntimeError, match="peer gone"):
        turns.run_pair(lambda: turns.wait_for(failed), lambda: None)
    turns.close()


def test_an_error_in_either_task_is_raised_after_both_end():
    turns, ended = Turns(), []

    def failing():
        turns.hand_over()
        raise RuntimeError("backward failed")

    def other():
        for _ in range(3):
            turns.hand_over()
        ended.append(True)

    with pytest.raises(RuntimeError, match="backward failed"):
        turns.run_pair(other, failing)
    assert ended == [True]
    turns.close()


@pytest.mark.parametrize("delay", [True, False], ids=["delay_wgrad", "wgrad-in-place"])
def test_a_backward_defers_its_experts_weight_gradients_only_when_asked(delay):
    from k2train.memory.weight_grads import grouped_project

    w = torch.randn(2, 8, 4, requires_grad=True)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    turns, computed_in_place = Turns(delay), []

    def backward():
        grouped_project(torch.randn(6, 8), w, offs).backward(torch.ones(6, 4))
        computed_in_place.append(w.grad is not None)

    turns.run_pair(lambda: None, backward)
    # What waited past the backward's last exchange (here: it has none) is carried to the next
    # backward's first exchange, or computed at the end of the step's loop.
    turns.flush()
    assert w.grad is not None
    w.grad = None
    turns.run_alone(backward)  # an unpaired backward (the cool-down's) defers as a paired one does
    turns.flush()
    turns.close()
    assert computed_in_place == [not delay] * 2
    assert w.grad is not None


def test_a_dispatch_exchange_leaves_one_weight_gradient_to_the_exchange_below(monkeypatch, tmp_path):
    # A MoE layer's backward queues its experts' three weight gradients; its dispatch exchange
    # computes two and leaves the last to the next exchange, the combine's of the MoE layer below.
    # The part's first MoE layer's dispatch exchange is the backward's last: what it holds is
    # carried to the next backward's first exchange, or to the end of the step's loop (flush).
    from dataclasses import replace

    import torch.distributed as dist

    import parallel.pipeline.overlap as overlap
    from k2train.config.schema import ModelConfig
    from k2train.model.transformer import K2Model, ModelPart
    from parallel.experts import AllToAllExchange, apply_expert_parallel

    cfg = ModelConfig(num_layers=4)  # layer 0 dense, layers 1-3 MoE
    part = K2Model(cfg, ModelPart(range(4), first_expert=0, num_local_experts=cfg.num_experts // 2))
    apply_expert_parallel(part, object(), 0, 2, turns=Turns(True))  # the groups are only kept here
    assert [part.layers[str(i)].mlp.exchange.held_wgrads for i in part.moe_layers()] == [1, 1, 1]
    apply_expert_parallel(part, object(), 0, 2, turns=Turns(False))  # nothing deferred, nothing held
    assert [part.layers[str(i)].mlp.exchange.held_wgrads for i in part.moe_layers()] == [0, 0, 0]

    # The rule at work, on one gloo process (an EP of 1 takes the exchange's code path too).
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, turns = K2Model(cfg), Turns(True)
        for i in model.moe_layers():
            moe = model.layers[str(i)].mlp
            moe.exchange = AllToAllExchange(dist.group.WORLD, 1, turns=turns, held_wgrads=overlap.HELD_WGRADS)
            moe.experts.policy = replace(moe.experts.policy, deferrable_wgrad=True)
        computed = []
        run = overlap.run_deferred_weight_grads

        def recorded(keep=0):
            computed.append(run(keep))
            return computed[-1]

        monkeypatch.setattr(overlap, "run_deferred_weight_grads", recorded)
        tokens = torch.randint(0, cfg.vocab_size, (2, 8))
        gate = model.layers["1"].mlp.experts  # the first MoE layer's experts: its held gradient is carried
        for backward in range(2):
            logits = model(tokens).output
            turns.run_alone(lambda: logits.square().mean().backward())
            if backward == 0:
                assert sum(p.grad is None for p in gate.parameters()) == 1
        turns.flush()
        assert all(p.grad is not None for p in gate.parameters())
        turns.close()
    finally:
        dist.destroy_process_group()
    # Per exchange, layers 3, 2, 1 (combine's, then dispatch's): the first backward's top combine
    # has nothing waiting, the second's computes the first's carried gradient; each dispatch leaves one.
    assert computed == [0, 2, 1, 2, 1, 2] + [1, 2, 1, 2, 1, 2]
    assert turns.deferred_grads == 2 * 3 * 3
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_layout_with_nothing_to_overlap_is_refused():
    assert overlap_runs("ep", 4) and not overlap_runs("none", 4)
    check_overlap("none", 1)
    check_overlap("ep", 2)
    with pytest.raises(ValueError, match="parallel.ep is 1"):
        check_overlap("ep", 1)


def test_config_rejects_unknown_overlap():
    from pathlib import Path

    from k2train.config.load import load_config

    with pytest.raises(Exception, match="parallel.overlap"):
        load_config(Path(__file__).parents[1] / "configs" / "k2_tiny.yaml", ["parallel.overlap=everything"])


# PP1 x EP4: forward m+1 paired with backward m, with K2's activation memory: offload, selective
# recompute and FP8 storage (a pair's forward packs while its backward fetches and recomputes, and
# the experts' FP8 projections defer their weight gradients); PP2 x V2 x EP2 x DP2: pairs inside
# the interleaved 1F1B, with the data-parallel reduction and the pipeline's sends and receives around
# them; PP2 x EP2 zero-bubble: the input-gradient pass paired, the weight-gradient pass after it.
MEMORY = ["memory.activation_offload=true", "memory.selective_recompute=true", "memory.fp8_activations=true"]


@pytest.mark.parametrize("layout,extra", [
    ((1, 1, 4, 1, "interleaved_1f1b"), MEMORY),
    ((2, 2, 2, 2, "interleaved_1f1b"), []),
    ((2, 1, 2, 1, "interleaved_zero_bubble"), []),
], ids=["pp1xep4-offload-recompute-fp8", "pp2xvp2xep2xdp2", "pp2xep2-zero-bubble"])
def test_overlap_matches_plain_bit_for_bit(layout, extra, data, plain_runs):
    pp, vp, ep, dp, schedule = layout
    overrides = BASE + layout_overrides(pp, vp, ep, dp, schedule) + extra
    # The plain run is test_parallel_training's of the same layout, made once per session.
    plain = plain_run(plain_runs, overrides, data, pp * ep * dp)
    overlapped = run_world(pp * ep * dp, "test_parallel_training:run_steps",
                           dict(overrides=overrides + ["parallel.overlap=ep"], data=data))
    for rank, (want, got) in enumerate(zip(plain, overlapped, strict=True)):
        # The overlapped run really paired: exchanges handed the turn over, pipelines ran pairs.
        assert want["hand_overs"] == 0 and got["hand_overs"] > 0, rank
        # Every full backward, paired or not (the cool-down's, pp = 1's last), computes its experts'
        # three weight gradients per MoE layer under its dispatch's exchange; a zero-bubble input
        # pass computes none (its weight pass follows the pair).
        backwards = STEPS * 256 // (16 * ep * dp)  # of each MoE layer (BASE: 256 tokens a step, 16 a micro-batch)
        want_deferred = 0 if schedule == "interleaved_zero_bubble" else 3 * got["moe_layers"] * backwards
        assert got["deferred_grads"] == want_deferred, rank
        if pp > 1:
            assert any("OVERLAP_F_B" in str(a) for a in got["schedule"][got["coords"].pp] if a), rank
        for step, (w, g) in enumerate(zip(want["steps"], got["steps"], strict=True), start=1):
            assert g["loss"] == w["loss"], (rank, step)
            assert g["norm"] == w["norm"], (rank, step)
            assert torch.equal(g["max_logits"], w["max_logits"]), (rank, step)
            assert torch.equal(g["counts"], w["counts"]), (rank, step)
            assert g["grads"].keys() == w["grads"].keys()
            for key, grad in g["grads"].items():
                assert torch.equal(grad, w["grads"][key]), (rank, step, key)
        for name, param in got["params"].items():
            assert torch.equal(param, want["params"][name]), (rank, name)

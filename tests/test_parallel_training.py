"""PP x EP x DP on gloo against one process: same seed, same data, same losses and gradients.

Each layout runs 3 optimizer steps. At every step the loss and every reduced gradient of every rank
must equal the single-process run's (an expert rank's gradients equal its slice of the experts),
and after the steps every replica of every parameter must be identical. Newton-Schulz runs in
float32 here, so that no bf16 rounding flip can hide or fake a difference.
"""

from __future__ import annotations

import re

import pytest
import torch

from multiproc import run_world, tiny_rank

STEPS = 3
# 16 sequences of 16 tokens per step; 4 layers (1 dense + 3 MoE) so PP x VP up to 4 has a layer per stage.
BASE = [
    "model.num_layers=4", "model.num_experts=8", "data.seq_len=16", "train.micro_batch_size=1",
    "train.global_batch_tokens=256", "optimizer.ns_dtype=float32", "optimizer.warmup_steps=1",
    # AdamW's eps 1e-8 turns a near-zero gradient element into a full +-lr step whose sign is float
    # noise (summation order differs between layouts); 1e-5 keeps such elements' steps small, so
    # later steps compare the layouts rather than that noise.
    "optimizer.adam_eps=1e-5",
    "logging.wandb=false", "logging.progress_bar=false", "logging.plots=false",
]


def layout_overrides(pp: int, vp: int, ep: int, dp: int, schedule: str = "interleaved_1f1b") -> list[str]:
    return [f"parallel.pp={pp}", f"parallel.vp={vp}", f"parallel.ep={ep}", f"parallel.dp={dp}",
            f"parallel.schedule={schedule}"]


def run_steps(payload: dict) -> dict:
    """On one rank: build the runner of the layout and take STEPS steps, recording loss and gradients."""
    cfg, state, runner = tiny_rank(payload["overrides"], payload["data"], trace_schedule=True)
    steps = []
    for _ in range(payload.get("steps", STEPS)):
        result = runner.forward_backward()
        grads = runner.owned_gradients()
        norm = runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(1e-2, result.max_logits_LH)
        runner.update_router_biases(result.counts_ME)
        steps.append(dict(loss=result.loss, grads=grads, norm=norm, max_logits=result.max_logits_LH,
                          counts=result.counts_ME))
    params = {n: p.detach().clone() for n, p in _named_params(runner)}
    biases = dict(zip(runner.model.moe_layer_ids(), (b.clone() for b in runner.model.router_biases())))
    first_expert = runner.model.parts[0].part.first_expert
    if state.is_distributed:
        torch.distributed.destroy_process_group()
    return dict(steps=steps, params=params, biases=biases, first_expert=first_expert,
                coords=state.coords, schedule=runner.schedule_table(), trace=getattr(runner, "trace", None),
                hand_overs=0 if runner.turns is None else runner.turns.hand_overs,
                deferred_grads=0 if runner.turns is None else runner.turns.deferred_grads,
                moe_layers=len(runner.model.moe_layer_ids()))


def plain_run(runs: dict, overrides: list[str], data: str, world: int) -> list[dict]:
    """`run_steps` of `overrides` on `world` processes, once per session (`runs`: the plain_runs fixture)."""
    key = tuple(overrides)
    if key not in runs:
        runs[key] = run_world(world, "test_parallel_training:run_steps", dict(overrides=overrides, data=data))
    return runs[key]


def _named_params(runner):
    # Strip the container prefix ("parts.<k>.") so names are the model's own.
    for name, param in runner.model.named_parameters():
        yield name.split(".", 2)[2], param


@pytest.fixture(scope="module")
def reference(data) -> dict:
    return run_world(1, "test_parallel_training:run_steps", dict(overrides=BASE + layout_overrides(1, 1, 1, 1), data=data))[0]


def _expected(reference_tensor: torch.Tensor, name: str, first_expert: int, num_local: int) -> torch.Tensor:
    return reference_tensor[first_expert:first_expert + num_local] if ".mlp.experts." in name else reference_tensor


LAYOUTS = [
    pytest.param((2, 2, 2, 2, "interleaved_1f1b"), id="pp2xvp2xep2xdp2"),
    pytest.param((1, 1, 4, 1, "interleaved_1f1b"), id="pp1xep4"),
    pytest.param((4, 1, 1, 2, "interleaved_1f1b"), id="pp4xdp2"),
    pytest.param((2, 1, 2, 1, "interleaved_zero_bubble"), id="pp2xep2-zero-bubble"),
    # An uneven split whose last stage holds only the head and the loss (parallel/pipeline/split.py).
    pytest.param((2, 2, 1, 1, "interleaved_1f1b", "parallel.stage_layers=[2,1,1,0]"), id="pp2xvp2-head-only-stage"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(layout, data, reference, plain_runs):
    pp, vp, ep, dp, schedule, *split = layout
    ranks = plain_run(plain_runs, BASE + layout_overrides(pp, vp, ep, dp, schedule) + split, data, pp * ep * dp)
    num_local = 8 // ep
    for rank, result in enumerate(ranks):
        for step, (got, want) in enumerate(zip(result["steps"], reference["steps"]), start=1):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (rank, step)
            assert got["norm"] == pytest.approx(want["norm"], rel=1e-5), (rank, step)
            torch.testing.assert_close(got["max_logits"], want["max_logits"], rtol=1e-5, atol=1e-6)
            assert torch.equal(got["counts"], want["counts"]), (rank, step)
        for name, param in result["params"].items():
            expected = _expected(reference["params"][name], name, result["first_expert"], num_local)
            # Looser than the gradients: AdamW divides by sqrt(v), so on near-zero gradients (rare
            # tokens' embedding rows) a float32 summation-order difference moves an element by up to lr.
            _assert_relative(param, expected, f"rank {rank} parameter {name} after {STEPS} steps", tol=1e-3)
        # Router biases move by the loads of the whole step on every rank: equal to one process, bit for bit.
        for layer, bias in result["biases"].items():
            assert torch.equal(bias, reference["biases"][layer]), (rank, layer)
    assert {layer for result in ranks for layer in result["biases"]} == set(reference["biases"])
    _assert_replicas_identical(ranks)
    # Every parameter's reduced gradient, assembled from its owners (ZeRO-1: each rank holds the
    # items it owns; an expert stack's experts sit on several ranks), equals one process's.
    for step in range(STEPS):
        want = reference["steps"][step]
        got = {key: grad for result in ranks for key, grad in result["steps"][step]["grads"].items()}
        for name, grad in _by_parameter(got).items():
            _assert_relative(grad, _by_parameter(want["grads"])[name], f"step {step + 1} gradient of {name}",
                             floor=1e-3 * want["norm"])
    # ZeRO-1: every item (matrix, expert matrix, vector) has exactly one owner in the world.
    owned = [key for result in ranks for key in result["steps"][0]["grads"]]
    assert sorted(owned) == sorted(reference["steps"][0]["grads"])


def _by_parameter(items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Item gradients by parameter: "name[e]" expert items stacked in expert order under "name"."""
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, grad in items.items():
        match = re.fullmatch(r"(.+)\[(\d+)\]", key)
        if match:
            stacks.setdefault(match.group(1), {})[int(match.group(2))] = grad
        else:
            out[key] = grad
    out.update({name: torch.stack([e[i] for i in sorted(e)]) for name, e in stacks.items()})
    return out


def _assert_relative(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5, floor: float = 0.0) -> None:
    """||got - want|| <= tol * max(||want||, floor), L2 over the tensor.

    Layouts sum in different orders, so float32 rounding differs; it is relative to the terms
    summed. A gradient that is the near-cancelling sum of much larger terms (a norm weight's, say)
    is measured against `floor`, a thousandth of the step's whole gradient norm.
    """
    assert got.shape == want.shape, what
    error = (got - want).norm().item()
    scale = max(want.norm().item(), floor)
    assert error <= tol * scale, f"{what}: error {error:.3e} over scale {scale:.3e}"


def _assert_replicas_identical(ranks: list[dict]) -> None:
    """Ranks holding the same parameter (same name, same expert slice) hold the same bits."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    for result in ranks:
        for name, param in result["params"].items():
            key = (name, result["first_expert"] if ".mlp.experts." in name else -1)
            if key in seen:
                assert torch.equal(seen[key], param), name
            else:
                seen[key] = param


def test_executed_interleaved_schedule_has_the_theoretical_bubble(data):
    """PP2 x VP2 with 8 micro-batches per rank: the runtime's table idles (p-1)/(v·m) of the busy
    time, and the stages ran their forwards and backwards in exactly the table's order."""
    pp, vp, dp = 2, 2, 2
    ranks = run_world(pp * dp, "test_parallel_training:run_steps",
                      dict(overrides=BASE + layout_overrides(pp, vp, 1, dp), data=data))
    micro_batches = 16 // dp
    table = ranks[0]["schedule"]
    makespan = max(len(line) for line in table.values())
    busy = [len(line) - line.count(None) for line in table.values()]
    assert busy == [2 * vp * micro_batches] * pp
    assert (makespan - busy[0]) / busy[0] == pytest.approx((pp - 1) / (vp * micro_batches))
    for result in ranks:
        planned = []
        for action in table[result["coords"].pp]:
            if action is not None:
                stage, kind, _ = re.fullmatch(r"(\d+)([FB])(\d+)", action).groups()
                planned.append((kind, int(stage)))
        assert result["trace"] == planned * STEPS  # the same order in every step

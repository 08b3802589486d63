"""The validation loss: the same value under every layout, and no trace on the training.

The evaluator runs the held-out sequences forward through the runner's own model parts (with pp > 1,
stage by stage with explicit sends, parallel/evaluate.py). PP2 x VP2 x EP2 x DP2 on gloo must give
the single process's loss, before and after an optimizer step, and taking a validation loss between
two steps must change neither the parameters nor anything the next step computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multiproc import run_world
from test_parallel_training import BASE, layout_overrides

ROOT = Path(__file__).parents[1]
EVAL = ["data.valid_fraction=0.2", "train.eval_every=1", "train.eval_batches=2"]


def eval_steps(payload: dict) -> dict:
    """On one rank: validation loss, a step, validation loss (or no validation), a step."""
    from k2train.config.load import load_config
    from k2train.train.loop import open_samplers
    from parallel.evaluate import Evaluator
    from parallel.startup import rank_runner, start_rank
    from launch.env import launch_env

    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", payload["overrides"])
    state = start_rank(cfg, launch_env())
    train_sampler, valid_sampler = open_samplers(cfg, payload["data"])
    runner = rank_runner(cfg, state, train_sampler)
    evaluator = Evaluator(runner, valid_sampler, cfg.train.eval_batches)
    out = dict(val=[], steps=[], unchanged=True)
    for _ in range(2):
        if payload["evaluate"]:
            before = [p.detach().clone() for p in runner.model.parameters()]
            biases = [b.clone() for b in runner.model.router_biases()]
            out["val"].append(evaluator.evaluate())
            out["val"].append(evaluator.evaluate())  # the same sequences again
            out["unchanged"] &= all(torch.equal(a, p) for a, p in zip(before, runner.model.parameters()))
            out["unchanged"] &= all(torch.equal(a, b) for a, b in zip(biases, runner.model.router_biases()))
            out["unchanged"] &= all(p.grad is None for p in runner.model.parameters())
        result = runner.forward_backward()
        norm = runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(1e-2, result.max_logits_LH)
        runner.update_router_biases(result.counts_ME)
        out["steps"].append(dict(loss=result.loss, norm=norm, max_logits=result.max_logits_LH, counts=result.counts_ME))
    out["params"] = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    if state.is_distributed:
        torch.distributed.destroy_process_group()
    return out


def _run(world: int, layout: list[str], data: str, evaluate: bool) -> list[dict]:
    return run_world(world, "test_evaluate:eval_steps", dict(overrides=BASE + EVAL + layout, data=data, evaluate=evaluate))


@pytest.fixture(scope="module")
def one(data) -> dict:
    return _run(1, layout_overrides(1, 1, 1, 1), data, True)[0]


def test_validation_changes_nothing_of_the_training(data, one):
    plain = _run(1, layout_overrides(1, 1, 1, 1), data, False)[0]
    assert one["unchanged"]
    assert one["val"][0] == one["val"][1] and one["val"][2] == one["val"][3]
    assert one["val"][2] != one["val"][0]  # the step moved the model
    for got, want in zip(one["steps"], plain["steps"], strict=True):
        assert got["loss"] == want["loss"] and got["norm"] == want["norm"]
        assert torch.equal(got["max_logits"], want["max_logits"]) and torch.equal(got["counts"], want["counts"])
    for name, param in one["params"].items():
        assert torch.equal(param, plain["params"][name]), name


def test_validation_loss_of_pp2xvp2xep2xdp2_equals_one_process(data, one):
    ranks = _run(8, layout_overrides(2, 2, 2, 2), data, True)
    for rank, result in enumerate(ranks):
        assert result["unchanged"], rank
        for got, want in zip(result["val"], one["val"], strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=0), rank
        for got, want in zip(result["steps"], one["steps"], strict=True):  # the training statistics
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and torch.equal(got["counts"], want["counts"])
            torch.testing.assert_close(got["max_logits"], want["max_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features", [
    pytest.param(["memory.fp8_activations=true", "memory.selective_recompute=true",
                  "memory.activation_offload=true"], id="fp8-recompute-offload"),
    pytest.param(["train.param_dtype=bfloat16"], id="bf16")])
def test_validation_runs_with_the_memory_features(data, features):
    result = _run(1, layout_overrides(1, 1, 1, 1) + features, data, True)[0]
    assert result["unchanged"] and all(0 < v < 10 for v in result["val"])


def test_a_run_logs_plots_and_summarises_the_validation_loss(tmp_path, data, capsys):
    from k2train.config.load import load_config
    from k2train.train.metrics import read_metrics, wandb_scalars
    from parallel.trainer import run_training
    from launch.env import launch_env

    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", [
        *BASE, *layout_overrides(1, 1, 1, 1), f"data.prefix={data}", "data.valid_fraction=0.2", "train.steps=3",
        "train.eval_every=2", "logging.plots=true", f"logging.run_root={tmp_path}", "logging.run_name=run"])
    result = run_training(cfg, launch_env())
    _, steps = read_metrics(result.run_dir)
    assert [s["step"] for s in steps if "val_loss" in s] == [2, 3]
    assert all(torch.isfinite(torch.tensor(s["val_loss"])) for s in steps if "val_loss" in s)
    printed = capsys.readouterr().out
    assert f"validation loss: {steps[1]['val_loss']:.4f} -> {steps[2]['val_loss']:.4f} at step 3" in printed
    assert "val loss" in printed  # the per-step line without a progress bar
    assert (result.run_dir / "loss.png").stat().st_size > 0
    assert json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[2])["val_loss"] == steps[1]["val_loss"]
    scalars = wandb_scalars({**steps[1], "data_share": {"web": 0.75, "code": 0.25}})
    assert scalars["val_loss"] == steps[1]["val_loss"] and scalars["data_share/code"] == 0.25

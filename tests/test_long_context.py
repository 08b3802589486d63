"""K2's long-context stage: resume a run at a longer data.seq_len with YaRN, and plan its memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2train.config.load import load_config
from k2train.data.indexed import IndexedDataset

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
BASE = [
    "model.num_layers=2", "train.global_batch_tokens=512", "optimizer.warmup_steps=1",
    "parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1", "data.valid_fraction=0.0",
    "train.eval_every=0", "logging.wandb=false", "logging.plots=false", "logging.progress_bar=false",
    "checkpoint.every_steps=1",
]
# The long-context stage: 4x the positions through YaRN from the 64 it was trained at, another expert kernel.
LONG = [
    "data.seq_len=256", "train.micro_batch_size=1", "model.max_position_embeddings=256",
    "model.yarn={factor: 4.0, original_max_position_embeddings: 64}", "model.expert_impl=loop",
]


def _run(tmp_path: Path, data: str, name: str, steps: int, *extra: str) -> list[dict]:
    from parallel.trainer import run_training
    from launch.env import launch_env

    run_training(load_config(TINY, [*BASE, f"data.prefix={data}", f"train.steps={steps}",
                                    f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.run_root={tmp_path / 'runs'}",
                                    f"logging.run_name={name}", *extra]), launch_env())
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()[1:]
    return [json.loads(line) for line in lines]


def _sampler(tmp_path: Path, step: int) -> dict:
    return json.loads((tmp_path / "ckpt" / f"step_{step:08d}" / "k2train.json").read_text())["sampler"]


def test_resume_into_a_longer_sequence_with_yarn(tmp_path):
    from k2train.data.prepare import prepare_dataset

    data = str(tmp_path / "corpus")
    prepare_dataset(sorted((ROOT / "k2train" / "data").glob("*.py")), data, "byte")
    short = _run(tmp_path, data, "short", 2, "data.seq_len=64", "train.micro_batch_size=2")
    before = _sampler(tmp_path, 2)
    assert before["seq_len"] == 64 and before["offset"] == 2 * 512 // 64
    # The stage change is deliberate: the data and batch settings differ from the checkpoint's run.
    resumed = _run(tmp_path, data, "long", 4, *LONG, "checkpoint.resume=changed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert all(0 < r["loss"] < 2 * short[0]["loss"] for r in resumed)  # finite, and not blown up
    after = _sampler(tmp_path, 4)
    tokens = IndexedDataset(data).num_tokens
    long_samples, short_samples = (tokens - 1) // 256, (tokens - 1) // 64
    assert after["seq_len"] == 256 and after["samples_per_epoch"] == long_samples
    # Re-cut at the same fraction of the epoch, then two steps of two 256-token sequences.
    assert (after["epoch"], after["offset"]) == (0, before["offset"] * long_samples // short_samples + 2 * 2)


def test_resume_still_refuses_another_model(tmp_path):
    from k2train.data.prepare import prepare_dataset
    from parallel.checkpoint.checkpointer import CheckpointError

    data = str(tmp_path / "corpus")
    prepare_dataset(sorted((ROOT / "k2train" / "data").glob("*.py")), data, "byte")
    _run(tmp_path, data, "short", 1, "data.seq_len=64", "train.micro_batch_size=2")
    with pytest.raises(CheckpointError, match="model.hidden_size=64, but this run has model.hidden_size=32"):
        _run(tmp_path, data, "other", 2, "data.seq_len=64", "train.micro_batch_size=2", "model.hidden_size=32")


def test_the_plan_shows_the_long_context_stage_memory():
    from parallel.layout import make_layout
    from parallel.plan.planner import make_plan
    from parallel.plan.cost import HARDWARE

    plans = {}
    for seq_len in (4096, 32768):
        cfg = load_config(ROOT / "configs" / "k2_1t.yaml", [
            f"data.seq_len={seq_len}", "model.max_position_embeddings=131072",
            "model.yarn={factor: 32.0, original_max_position_embeddings: 4096}"])
        layout = make_layout(256, cfg.parallel, num_layers=cfg.model.num_layers,
                             num_experts=cfg.model.num_experts, micro_batches=None)
        plans[seq_len] = make_plan(cfg, layout, HARDWARE["h800"]).ranks[0]
    short, long = plans[4096], plans[32768]
    # Saved activations per micro-batch grow with its tokens (attention saves no S x S matrix).
    for stage, saved in long.saved.items():
        assert saved.total >= 7.9 * short.saved[stage].total, stage
    # So do the activations in flight; with activation offload most of them wait in host memory
    # (the device keeps what its budget allows), so they are compared in both places together.
    def in_flight(r):
        return r.as_built.activations + r.as_built.host_activations

    assert in_flight(long) > 4 * in_flight(short)
    assert long.as_built.parameters == short.as_built.parameters

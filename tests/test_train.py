"""The training loop and CLI end to end on the tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from k2train.config.load import load_config
from k2train.data.prepare import prepare_dataset
from k2train.model import K2Model
from k2train.train.loop import NonFiniteLossError
from k2train.train.metrics import read_metrics
from parallel.trainer import run_training as train
from launch.env import launch_env
from parallel.zero1.optimizer import ShardedMuonClip

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small byte-tokenised dataset of this repository's own Python sources."""
    out = tmp_path_factory.mktemp("data") / "sources"
    files = sorted((ROOT / "k2train").rglob("*.py"))
    prepare_dataset(files, out, "byte")
    return str(out)


def tiny(tmp_path: Path, corpus: str, *overrides: str):
    """The tiny config on one process (its own layout needs 8)."""
    base = [
        f"data.prefix={corpus}", f"logging.run_root={tmp_path}", "logging.run_name=run", "logging.wandb=false",
        "logging.progress_bar=false", "train.global_batch_tokens=512", "train.micro_batch_size=4",
        "parallel.pp=1", "parallel.vp=1", "parallel.ep=1",
    ]
    return load_config(TINY, [*base, *overrides])


def test_tiny_run_learns_and_writes_its_run_directory(tmp_path, corpus, capsys):
    cfg = tiny(
        tmp_path, corpus, "train.steps=16", "optimizer.warmup_steps=2", "optimizer.stable_steps=14",
        "optimizer.decay_steps=1",
    )
    result = train(cfg, launch_env())
    printed = capsys.readouterr().out
    assert f"run directory {result.run_dir}" in printed and "step 16/16  loss" in printed
    header, steps = read_metrics(result.run_dir / "metrics.jsonl")
    first_line = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: first_line[k] for k in ("world_size", "pp", "vp", "ep", "dp")} == dict(
        world_size=1, pp=1, vp=1, ep=1, dp=1
    )
    assert [s["step"] for s in steps] == list(range(1, 17))
    for record in steps:
        assert {"loss", "lr", "tokens_per_s"} <= record.keys()
        assert len(record["max_logit"]) == cfg.model.num_layers
        assert len(record["expert_load"]) == cfg.model.num_moe_layers
        assert sum(record["expert_load"][0]) == pytest.approx(1.0)
    assert steps[-1]["tokens"] == 16 * 512
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    for name in ("loss.png", "max_logit.png", "expert_load.png"):
        assert (result.run_dir / name).stat().st_size > 0
    assert load_config(result.run_dir / "config.yaml") == cfg


def test_gradient_accumulation_equals_one_large_micro_batch(tmp_path, corpus, monkeypatch):
    """Two micro-batches of 4 sequences give the gradients, max logits and expert loads of one
    micro-batch of 8. (Gradients, not updated weights: Newton-Schulz runs in bf16, where
    float32 rounding differences of the accumulation order can flip a bf16 rounding.)"""
    seen = []
    step = ShardedMuonClip.step

    def capture_step(self, lr, max_logits_LH, layers):
        seen.append({**self.owned_gradients(), "max_logits": max_logits_LH.clone()})
        return step(self, lr, max_logits_LH, layers)

    monkeypatch.setattr(ShardedMuonClip, "step", capture_step)
    for micro in (4, 8):
        train(tiny(tmp_path / str(micro), corpus, "train.steps=1", f"train.micro_batch_size={micro}",
                   "logging.plots=false"), launch_env())
    accumulated, single = seen
    assert accumulated.keys() == single.keys()
    for name in accumulated:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-5, atol=1e-7, msg=name)
    loads = [read_metrics(tmp_path / str(m) / "run")[1][0]["expert_load"] for m in (4, 8)]
    assert loads[0] == loads[1]


def test_nonfinite_loss_stops_with_step_and_last_good_metrics(tmp_path, corpus, monkeypatch):
    calls = {"n": 0}
    forward = K2Model.forward

    def poisoned(self, tokens):
        calls["n"] += 1
        out = forward(self, tokens)
        if calls["n"] > 2 * 2:  # two micro-batches per step: steps 1-2 are clean, step 3 is not
            out.output = out.output * float("nan")
        return out

    monkeypatch.setattr(K2Model, "forward", poisoned)
    cfg = tiny(tmp_path, corpus, "train.steps=5")
    with pytest.raises(NonFiniteLossError, match=r"step 3") as err:
        train(cfg, launch_env())
    assert "step 2" in str(err.value)
    _, steps = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    assert (tmp_path / "run" / "loss.png").is_file()


def test_unfit_layouts_refuse_to_start(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"needs 2 or more processes, but this is one; launch it with `torchrun"):
        train(tiny(tmp_path, corpus, "parallel.pp=2", "parallel.dp=null"), launch_env())
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_in_one_sentence(tmp_path, capsys):
    assert main(["train", "--config", str(TINY), "--set", "optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2train: error:") and "optimizer.lrr" in err and "\n" not in err
    missing = tmp_path / "nothing"
    runs = tmp_path / "runs"
    one_process = [arg for key in ("pp", "vp", "ep", "dp") for arg in ("--set", f"parallel.{key}=1")]
    assert main(["train", "--config", str(TINY), "--set", f"data.prefix={missing}", "--set", f"logging.run_root={runs}",
                 *one_process]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "Traceback" not in err
    assert not runs.exists()  # nothing half-written


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "k2train", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--set" in result.stdout


def _poison_step(monkeypatch, bad_steps: set[int], micro_batches: int) -> None:
    calls = {"n": 0}
    forward = K2Model.forward

    def poisoned(self, tokens):
        calls["n"] += 1
        out = forward(self, tokens)
        if (calls["n"] - 1) // micro_batches + 1 in bad_steps:
            out.output = out.output * float("nan")
        return out

    monkeypatch.setattr(K2Model, "forward", poisoned)


def test_nonfinite_skip_policy_drops_the_update_and_goes_on(tmp_path, corpus, monkeypatch, capsys):
    _poison_step(monkeypatch, {2}, micro_batches=2)
    train(tiny(tmp_path, corpus, "train.steps=4", "train.on_nonfinite=skip"), launch_env())
    _, steps = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    assert steps[1]["loss"] != steps[1]["loss"]  # NaN, kept in the log
    assert all(s["loss"] == s["loss"] for s in steps if not s["skipped"])
    assert "step 2: loss nan" in capsys.readouterr().err


def test_nonfinite_stop_policy_checkpoints_the_last_good_state(tmp_path, corpus, monkeypatch):
    _poison_step(monkeypatch, {3}, micro_batches=2)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(tiny(tmp_path, corpus, "train.steps=5", "checkpoint.every_steps=10", f"checkpoint.dir={ckpt}"),
              launch_env())
    assert (ckpt / "latest").read_text() == "step_00000002"


def test_loss_spikes_are_flagged_against_the_recent_mean():
    from k2train.train.loop import SpikeWatch

    watch = SpikeWatch(1.5)
    assert [watch.observe(x) for x in (2.0, 2.0, 2.0, 2.1, 3.5, 2.0)] == [False, False, False, False, True, False]
    assert not any(SpikeWatch(0.0).observe(x) for x in (1.0, 1.0, 1.0, 100.0))

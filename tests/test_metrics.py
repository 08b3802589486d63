"""Metrics log, wandb mirror, end-of-run plots and summary, on fake runs made here."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from matplotlib.image import imread

from k2train.train.metrics import METRICS_FILE, MetricsLog, read_metrics, wandb_scalars
from k2train.train.plots import FIG_SIZE_PX, write_plots
from k2train.train.summary import MAX_COLUMNS, MAX_LINES, format_nonfinite_stop, format_summary


def fake_header(**overrides):
    header = dict(
        world_size=8, pp=2, vp=2, ep=2, dp=2, config="k2_tiny", params_total=1_234_567,
        params_active=456_789, started_at="2025-01-02T03:04:05+00:00",
    )
    return {**header, **overrides}


def fake_steps(num_steps=12, num_layers=3, dense_layers=1, heads=4, experts=8, seed=0):
    """Step records with the contract's shapes: loss falling, logits rising past tau = 100."""
    rng = random.Random(seed)
    steps, tokens = [], 0
    for step in range(1, num_steps + 1):
        tokens += 2048
        max_logit = [[rng.uniform(10, 130) * step / num_steps for _ in range(heads)]
                     for _ in range(num_layers)]
        load = []
        for _ in range(num_layers - dense_layers):
            raw = [rng.uniform(0.5, 1.5) for _ in range(experts)]
            load.append([value / sum(raw) for value in raw])
        steps.append(dict(
            step=step, loss=6.0 - 0.2 * step + rng.uniform(0, 0.05), lr=2e-4 * min(1.0, step / 4),
            tokens_per_s=50.0 if step == 1 else 1000.0, tokens=tokens,
            step_time_s=40.96 if step == 1 else 2.048, grad_norm=rng.uniform(0.1, 2.0),
            max_logit=max_logit, max_logit_layer=[max(heads_) for heads_ in max_logit],
            qk_clipped_heads=[sum(v > 100 for v in heads_) for heads_ in max_logit],
            expert_load=load, expert_load_imbalance=[max(row) * experts for row in load],
            router_bias_abs_mean=[rng.uniform(0, 1e-3) for _ in load],
        ))
    return steps


def write_run(run_dir, header, steps):
    with MetricsLog(run_dir, header) as log:
        for record in steps:
            log.log_step(record)


def test_records_read_back_equal(tmp_path):
    header, steps = fake_header(), fake_steps()
    write_run(tmp_path, header, steps)
    read_header, read_steps = read_metrics(tmp_path)
    assert read_header == {"kind": "run", **header}
    assert read_steps == [{"kind": "step", **record} for record in steps]
    assert read_metrics(tmp_path / METRICS_FILE) == (read_header, read_steps)


def test_nonfinite_values_round_trip_as_valid_json(tmp_path):
    steps = fake_steps(num_steps=3)
    steps[1]["loss"] = math.nan
    steps[1]["grad_norm"] = math.inf
    steps[2]["max_logit"][0][1] = -math.inf
    write_run(tmp_path, fake_header(), steps)

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    for line in (tmp_path / METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=reject)
    _, read_steps = read_metrics(tmp_path)
    assert math.isnan(read_steps[1]["loss"])
    assert read_steps[1]["grad_norm"] == math.inf
    assert read_steps[2]["max_logit"][0][1] == -math.inf
    assert read_steps[0]["loss"] == steps[0]["loss"]


def test_lines_survive_a_crash_and_a_torn_line_is_skipped(tmp_path):
    steps = fake_steps(num_steps=3)
    log = MetricsLog(tmp_path, fake_header())
    for record in steps:
        log.log_step(record)
    # No close(): a crashed process still leaves every flushed line readable.
    assert [r["step"] for r in read_metrics(tmp_path)[1]] == [1, 2, 3]
    log.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"kind": "step", "step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)[1]] == [1, 2, 3]
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write("ss\n")
    with pytest.raises(ValueError, match="line 5 is not valid JSON"):
        read_metrics(tmp_path)


def test_bad_records_and_reused_directory_are_refused(tmp_path):
    record = fake_steps(num_steps=1)[0]
    with MetricsLog(tmp_path, fake_header()) as log:
        with pytest.raises(KeyError, match="grad_norm"):
            log.log_step({k: v for k, v in record.items() if k != "grad_norm"})
        with pytest.raises(TypeError, match="'loss' holds a ndarray"):
            log.log_step({**record, "loss": np.array(1.0)})
    with pytest.raises(FileExistsError, match="already exists"):
        MetricsLog(tmp_path, fake_header())
    with pytest.raises(KeyError, match="params_active"):
        header = {k: v for k, v in fake_header().items() if k != "params_active"}
        MetricsLog(tmp_path / "other", header)


def test_wandb_scalars_are_the_flat_per_layer_values():
    record = fake_steps(num_steps=1)[0]
    scalars = wandb_scalars(record)
    assert set(scalars) == {
        "loss", "lr", "tokens_per_s", "grad_norm",
        "max_logit/layer_0", "max_logit/layer_1", "max_logit/layer_2",
        "qk_clip/layer_0", "qk_clip/layer_1", "qk_clip/layer_2",
        "expert_imbalance/layer_1", "expert_imbalance/layer_2",  # layer 0 is dense
    }
    assert scalars["max_logit/layer_2"] == record["max_logit_layer"][2]
    assert scalars["expert_imbalance/layer_1"] == record["expert_load_imbalance"][0]


def test_wandb_offline_run_is_written_in_the_run_dir(tmp_path, monkeypatch):
    for name in ("CACHE", "CONFIG", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    with MetricsLog(run_dir, fake_header(), use_wandb=True, config={"name": "k2_tiny"}) as log:
        for record in fake_steps(num_steps=3):
            log.log_step(record)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    data = offline[0].read_bytes()
    assert b"max_logit/layer_2" in data and b"expert_imbalance/layer_1" in data
    assert len(read_metrics(run_dir)[1]) == 3

    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    with pytest.raises(RuntimeError, match="set logging.wandb: false"):
        MetricsLog(tmp_path / "broken", fake_header(), use_wandb=True)
    assert not (tmp_path / "broken" / METRICS_FILE).exists()


def _check_png(path):
    image = imread(path)
    width, height = FIG_SIZE_PX[path.name]
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plots_for_a_moe_run(tmp_path):
    written = write_plots(tmp_path, fake_header(), fake_steps(), tau=100.0)
    assert [p.name for p in written] == ["loss.png", "max_logit.png", "expert_load.png"]
    for path in written:
        _check_png(path)


@pytest.mark.parametrize(
    "num_steps, num_layers, dense_layers", [(1, 3, 1), (5, 2, 2), (4, 14, 1)],
    ids=["one-step", "no-moe", "many-layers"],
)
def test_plots_for_short_dense_and_deep_runs(tmp_path, num_steps, num_layers, dense_layers):
    steps = fake_steps(num_steps=num_steps, num_layers=num_layers, dense_layers=dense_layers)
    steps[-1]["loss"] = math.nan
    written = write_plots(tmp_path, fake_header(), steps, tau=None)
    expected = ["loss.png", "max_logit.png"]
    expected += ["expert_load.png"] if dense_layers < num_layers else []
    assert [p.name for p in written] == expected
    for path in written:
        _check_png(path)


def test_summary_fits_one_screen_and_has_the_key_numbers(tmp_path):
    header, steps = fake_header(), fake_steps()
    write_run(tmp_path, header, steps)
    text = format_summary(header, steps, tmp_path, tau=100.0)
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES and max(map(len, lines)) <= MAX_COLUMNS
    last = steps[-1]
    clipped = sum(sum(r["qk_clipped_heads"]) for r in steps)
    low = min(steps, key=lambda r: r["loss"])
    for expected in (
        "k2_tiny", "pp 2 x ep 2 x dp 2, vp 2", "1.23M total", "457K active", "steps: 12",
        "tokens: 24.6K", "1K tokens/s mean (after step 1)",
        f"loss: {steps[0]['loss']:.4f} -> {last['loss']:.4f}",
        f"(min {low['loss']:.4f} at step {low['step']})",
        f"lr: final {last['lr']:.3e}", f"{clipped} heads clipped",
        f"L2 {last['max_logit_layer'][2]:.4g}", f"L1 {last['expert_load_imbalance'][0]:.3f}",
        str(tmp_path), METRICS_FILE,
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_summary_of_a_k2_sized_run_is_condensed(tmp_path):
    header = fake_header(
        world_size=4096, pp=16, ep=16, dp=16, params_total=1.04e12, params_active=32.6e9
    )
    steps = fake_steps(num_steps=3, num_layers=61, heads=64, experts=384)
    run_dir = tmp_path / ("a-long-run-directory-name" * 5)
    run_dir.mkdir()
    for index in range(40):
        (run_dir / f"checkpoint-step-{index:06d}").mkdir()
    lines = format_summary(header, steps, run_dir, tau=100.0).splitlines()
    assert len(lines) <= MAX_LINES and max(map(len, lines)) <= MAX_COLUMNS
    text = "\n".join(lines)
    assert "1.04T total" in text and "32.6B active" in text and "median" in text


def test_summary_without_steps_or_moe(tmp_path):
    assert "no optimizer step finished" in format_summary(fake_header(), [], tmp_path, tau=None)
    dense = format_summary(fake_header(), fake_steps(num_steps=2, dense_layers=3), tmp_path, None)
    assert "no MoE layers" in dense


def test_nonfinite_stop_message_names_the_step():
    last_good = fake_steps(num_steps=41)[-1]
    message = format_nonfinite_stop(42, last_good)
    assert "step 42" in message and "step 41" in message
    assert f"loss {last_good['loss']:.4f}" in message and f"lr {last_good['lr']:.3e}" in message
    assert "grad norm" in message
    assert "step 7" in format_nonfinite_stop(7, None)

"""`k2train profile`: FLOPs per token against counted matmuls, the time split and activation peak on
known spans, a real 4-process gloo profile (pp 2 x vp 2 x ep 2) checked for its invariants, one
process against an independent saved-bytes count, and the configs that cannot run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from multiproc import run_world

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.plots=false"]
# 1024 tokens: 4 micro-batches of 2 x 64 per sequence rank on ep 2 x dp 1.
WORLD = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=2", "parallel.dp=1", "train.global_batch_tokens=1024"]
ONE_PROCESS = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1", "train.global_batch_tokens=512"]


# -- FLOPs per token -------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """In-process torch work on one thread: other tests' processes share this machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flops_per_token_equal_the_matmuls_of_a_real_forward_and_backward(one_thread):
    from k2train.config.load import load_config
    from k2train.model import K2Model
    from k2train.train.flops import flops_per_token
    from parallel.pipeline.stages import lm_loss

    # The per-expert loop runs plain matmuls, which the counter knows (it has no _grouped_mm formula).
    cfg = load_config(TINY, ["model.expert_impl=loop"]).model
    model = K2Model(cfg, seed=0)
    B, S = 2, 8
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as forward:
        model(tokens)
    with FlopCounterMode(display=False) as training:
        lm_loss(model(tokens).output, tokens).backward()
    # The eager attention computes the whole S x S square and masks it: count it unmasked.
    full = flops_per_token(cfg, S, causal=False)
    assert forward.get_total_flops() == B * S * full.forward
    assert training.get_total_flops() == B * S * full.training
    causal = flops_per_token(cfg, S)
    assert causal.attention_scores * 2 == full.attention_scores
    assert causal.forward == full.forward - full.attention_scores // 2


def test_k2_flops_outside_attention_scores_are_twice_the_activated_matrix_parameters():
    from k2train.config.load import load_config
    from k2train.model import count_parameters
    from k2train.train.flops import flops_per_token

    m = load_config(ROOT / "configs" / "k2_1t.yaml").model
    _, active = count_parameters(m)
    # Activated parameters that are no matrix product: the embedding and every RMSNorm weight.
    not_matmul = m.vocab_size * m.hidden_size + m.hidden_size + m.num_layers * (
        2 * m.hidden_size + m.q_lora_rank + m.kv_lora_rank)
    flops = flops_per_token(m, 4096)
    assert flops.forward - flops.attention_scores == 2 * (active - not_matmul)
    assert flops.attention_scores == 61 * 64 * 4096 * (128 + 64 + 128)


# -- the step's time split and the activation peak, on known spans -----------------------------------


def test_time_breakdown_counts_every_instant_once_by_the_innermost_span():
    from parallel.profiling.timing import Span, time_breakdown

    spans = [Span("schedule", 1, 8), Span("F", 1, 3, 0, 0), Span("comm", 2, 2.5, name="all_to_all_single"),
             Span("B", 4, 6, 0, 0), Span("optimizer", 8, 9), Span("comm", 8.5, 9, name="all_gather")]
    split = time_breakdown(spans, 10.0)
    assert split == dict(forward=1.5, backward=2.0, optimizer=0.5, communication=1.0, pipeline_idle=3.0, other=2.0)


def test_peak_saved_bytes_frees_a_split_backward_at_its_weight_part():
    from parallel.profiling.timing import Span, peak_saved_bytes

    def forward(mb, end, nbytes):
        return Span("F", end - 0.5, end, 0, mb, saved_bytes=nbytes)

    spans = [forward(0, 1, 100), forward(1, 2, 50), Span("B", 2.5, 3, 0, 0), forward(2, 4, 70),
             Span("I", 4.5, 5, 0, 1), forward(3, 5.5, 200), Span("W", 5.8, 6, 0, 1)]
    # After F3: 50 (mb 1, whose weights' backward W has not run) + 70 + 200.
    assert peak_saved_bytes(spans) == 320


def test_peak_is_the_flag_or_the_known_gpu_and_unknown_on_cpu():
    from parallel.profiling.report import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == (989.0, "H100 bf16 dense peak")
    assert peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert peak_tflops("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")
    assert peak_tflops("cpu", None) == (None, "no known peak for cpu: give --peak-tflops")


# -- a real profile: 4 gloo processes ---------------------------------------------------------------


def profile_rank(payload: dict):
    """On one rank: profile the tiny config; rank 0 returns the report."""
    from k2train.config.load import load_config
    from parallel.profiling.run import ProfileOptions, run_profile
    from launch.env import launch_env

    cfg = load_config(TINY, payload["overrides"])
    return run_profile(cfg, ProfileOptions(**payload["options"]), launch_env())


@pytest.fixture(scope="module")
def profiled(data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("profile")
    overrides = [*QUIET, *WORLD, f"data.prefix={data}"]
    ranks = run_world(4, "test_profile:profile_rank",
                      dict(overrides=overrides, options=dict(warmup=1, steps=2, out=str(out))))
    assert ranks[1:] == [None, None, None]
    return ranks[0], out


def test_profile_report_adds_up(profiled):
    from k2train.config.load import load_config
    from k2train.train.flops import flops_per_token

    report, _ = profiled
    cfg = load_config(TINY, WORLD)
    assert report["layout"] | dict(micro_batches=0) == dict(
        world_size=4, pp=2, vp=2, ep=2, dp=1, schedule="interleaved_1f1b", micro_batches=0,
        micro_batch_size=2, seq_len=64)
    assert report["layout"]["micro_batches"] == 4
    assert len(report["step_time_s"]["per_step"]) == 2
    # Each step takes as long as its slowest rank: the mean of those maxima bounds every rank's mean.
    assert report["step_time_s"]["mean"] >= max(r["step_s"] for r in report["ranks"]) * (1 - 1e-12)
    for rank in report["ranks"]:
        split = rank["time_s"]
        assert sum(split.values()) == pytest.approx(rank["step_s"], rel=1e-9), rank["rank"]
        assert all(split[c] > 0 for c in ("forward", "backward", "optimizer", "communication", "pipeline_idle"))
        assert min(split.values()) >= 0
    assert sum(r["tokens_per_step"] for r in report["ranks"]) == report["tokens_per_step"] == 1024
    assert report["tokens_per_s"]["total"] == pytest.approx(1024 / report["step_time_s"]["mean"])
    flops = flops_per_token(cfg.model, 64)
    assert report["flops"]["per_token"]["training"] == flops.training
    assert report["flops"]["achieved_per_s"] == pytest.approx(flops.training * report["tokens_per_s"]["total"])
    assert report["flops"]["mfu"] is None and "--peak-tflops" in report["flops"]["peak_source"]
    memory = report["memory"]["per_pipeline_rank"]
    assert [m["stages"] for m in memory] == [[0, 2], [1, 3]]
    for entry in memory:
        assert entry["peak_bytes"] == sum(entry["accounted"].values())
        assert min(entry["accounted"].values()) > 0


def test_profile_timeline_holds_the_executed_schedule(profiled):
    from parallel.pipeline.schedule_table import timeline

    report, out = profiled
    spans = json.loads((out / "timeline.json").read_text())
    planned = timeline(2, 2, 4)
    for rank in spans["ranks"]:
        actions = [(kind, stage, mb) for kind, stage, mb, *_ in rank["spans"] if kind in ("F", "B")]
        assert actions == [(op.kind, op.stage, op.microbatch) for op in planned[rank["pp"]] if op is not None]
        for kind, _, _, start, end, _ in rank["spans"]:
            assert 0 <= start <= end <= rank["step_s"], (rank["rank"], kind)
        assert any(kind == "comm" for kind, *_ in rank["spans"])


def test_profile_writes_its_files(profiled):
    from matplotlib.image import imread

    report, out = profiled
    assert sorted(report["files"]["traces"]) == [f"trace/rank{r}.json" for r in range(4)]
    for trace in report["files"]["traces"]:
        assert json.loads((out / trace).read_text())["traceEvents"]
    assert json.loads((out / "report.json").read_text()) == report
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("k2train profile: k2_tiny on 4 ranks") and len(summary.splitlines()) < 30
    image = imread(out / "timeline.png")
    assert image.shape[:2] == (360, 1600) and image.std() > 0  # 4 rows; not a blank canvas


# -- one process -------------------------------------------------------------------------------------


def test_one_process_profile_counts_one_micro_batch_of_saved_activations(data, tmp_path):
    from k2train.config.load import load_config
    from k2train.memory.fp8 import saved_bytes
    from k2train.model import K2Model

    overrides = [*QUIET, *ONE_PROCESS, f"data.prefix={data}"]
    (report,) = run_world(1, "test_profile:profile_rank",
                          dict(overrides=overrides, options=dict(warmup=1, steps=1, out=str(tmp_path), torch_trace=False)))
    cfg = load_config(TINY, overrides)
    (rank,) = report["ranks"]
    assert rank["tokens_per_step"] == 512 and rank["time_s"]["pipeline_idle"] == 0
    assert rank["time_s"]["communication"] == 0 and rank["time_s"]["forward"] > 0 < rank["time_s"]["backward"]
    # Without a pipeline a micro-batch's backward ends before the next forward: the peak is one forward's.
    # The embedding saves its token ids, a view of the step's whole batch (4 micro-batches): the
    # batch's storage stays alive, so it counts.
    model = K2Model(cfg.model, seed=cfg.train.seed)
    batch = torch.randint(0, 257, (4 * cfg.train.micro_batch_size, cfg.data.seq_len))
    expected = saved_bytes(model, batch.chunk(4)[0], exclude=[*model.parameters(), *model.buffers()])
    (memory,) = report["memory"]["per_pipeline_rank"]
    assert memory["accounted"]["saved_activations"] == expected
    assert memory["accounted"]["parameters"] == sum(p.numel() * 4 for p in model.parameters())
    assert report["files"]["traces"] == [] and not (tmp_path / "trace" / "rank0.json").exists()


# -- configs that cannot run here ------------------------------------------------------------------


def test_k2_1t_stops_at_once_naming_the_world_it_needs(capsys):
    from launch.cli import main

    # The offload switches are off so the check reached is the layout's, whatever offload supports.
    code = main(["profile", "--config", str(ROOT / "configs" / "k2_1t.yaml"),
                 "--set", "memory.activation_offload=false", "--set", "memory.optimizer_offload=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "256 or more processes, but this is one" in err


def test_k2_1t_on_one_process_stops_naming_the_memory_it_needs():
    from k2train.config.checks import ConfigError
    from k2train.config.load import load_config
    from parallel.profiling.run import ProfileOptions, run_profile
    from launch.env import launch_env

    cfg = load_config(ROOT / "configs" / "k2_1t.yaml", [*ONE_PROCESS[:4], "parallel.device=cpu",
                                                         "memory.activation_offload=false", "memory.optimizer_offload=false"])
    with pytest.raises(ConfigError, match=r"k2_1t needs at least 5,73\d\.\d GiB on rank 0 .* 1,026,408,209,408 parameters"):
        run_profile(cfg, ProfileOptions(), launch_env())


def test_profile_refuses_a_step_count_below_one(capsys):
    from launch.cli import main

    with pytest.raises(SystemExit):
        main(["profile", "--config", str(TINY), "--warmup", "0"])
    assert "'0' is not a whole number of steps of at least 1" in capsys.readouterr().err

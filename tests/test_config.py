"""The config system: shipped configs, strict loading, overrides, round trips and value rules."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from k2train.config import (
    ConfigError,
    JobConfig,
    YarnConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    micro_batches_per_step,
    save_config,
    validate_world,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = ("k2_1t", "k2_tiny", "moonlight_16b_a3b")
TINY = CONFIGS / "k2_tiny.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_sets_every_key(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.name == name
    # Every key is written out, so a reader of the file sees the whole run.
    raw = yaml.safe_load(path.read_text())
    for section in dataclasses.fields(JobConfig):
        if section.name == "name":
            continue
        expected = {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
        assert set(raw[section.name]) == expected, section.name


def test_k2_1t_is_the_paper_model_layout_and_recipe():
    cfg = load_config(CONFIGS / "k2_1t.yaml")
    m, p, o, t = cfg.model, cfg.parallel, cfg.optimizer, cfg.train
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.first_dense_layers) == (163840, 7168, 61, 1)
    assert (m.dense_intermediate_size, m.moe_intermediate_size) == (18432, 2048)
    assert (m.num_experts, m.experts_per_token, m.num_shared_experts) == (384, 8, 1)
    assert m.routed_scaling_factor == 2.827 and m.num_heads == 64
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (m.rms_norm_eps, m.rope_theta, m.max_position_embeddings, m.yarn) == (1e-6, 50000.0, 4096, None)
    assert (p.pp, p.vp, p.ep, p.dp, p.gpus_per_node, p.device) == (16, 2, 16, None, 8, "cuda")
    assert (o.lr, o.min_lr, o.weight_decay, o.qk_clip_tau, o.warmup_steps) == (2e-4, 2e-5, 0.1, 100.0, 500)
    assert t.global_batch_tokens == 16384 * 4096 and cfg.data.seq_len == 4096
    assert o.stable_steps == round(10e12 / t.global_batch_tokens)
    assert o.decay_steps == round(5.5e12 / t.global_batch_tokens)
    assert t.steps == o.warmup_steps + o.stable_steps + o.decay_steps
    assert all(dataclasses.astuple(cfg.memory)) and t.param_dtype == "bfloat16"
    # 32 nodes: dp 1, and each of the 16 EP ranks of a stage runs 1024 sequences of 4096.
    assert validate_world(cfg, 256, "k2_1t") == 1
    assert micro_batches_per_step(cfg, 1) == 1024
    assert validate_world(cfg, 512, "k2_1t") == 2


def test_k2_tiny_accumulates_gradients_over_its_schedule():
    cfg = load_config(TINY)
    o = cfg.optimizer
    assert micro_batches_per_step(cfg, 1) == 8
    assert o.warmup_steps + o.stable_steps + o.decay_steps == cfg.train.steps
    assert (cfg.parallel.device, cfg.train.param_dtype, cfg.data.prefix) == ("cpu", "float32", "")


def test_moonlight_fills_one_node_and_dp_follows_the_world():
    cfg = load_config(CONFIGS / "moonlight_16b_a3b.yaml")
    assert (cfg.model.num_layers, cfg.model.num_experts, cfg.model.num_shared_experts) == (27, 64, 2)
    assert validate_world(cfg, 8, "m") == 1
    assert validate_world(cfg, 16, "m") == 2
    with pytest.raises(ConfigError, match=r"m: a world of 12 ranks is not a multiple of .* = 8 ranks"):
        validate_world(cfg, 12, "m")


def test_configs_are_frozen():
    cfg = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"


# ---- defaults and round trips ------------------------------------------------------------------


def test_missing_sections_and_keys_take_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model: {num_layers: 4}\n", "small_run.yaml"))
    assert cfg.name == "small_run"
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == JobConfig().model.hidden_size
    assert cfg.optimizer == JobConfig().optimizer
    assert load_config(write(tmp_path, "", "empty.yaml")) == dataclasses.replace(JobConfig(), name="empty")


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_and_load_round_trip(tmp_path, name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert load_config(save_config(cfg, tmp_path / "out" / "saved.yaml")) == cfg


def test_round_trip_keeps_yarn_null_dp_and_float_tuples(tmp_path):
    cfg = load_config(TINY, ["model.yarn={factor: 4, original_max_position_embeddings: 64}",
                             "parallel.dp=null", "optimizer.ns_coefficients=[1, 2.5, -3]",
                             "logging.run_name=0042"])
    text = dump_config(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert config_to_dict(cfg)["optimizer"]["ns_coefficients"] == [1.0, 2.5, -3.0]


# ---- overrides ---------------------------------------------------------------------------------


def test_overrides_are_typed_nested_and_nullable(tmp_path):
    cfg = load_config(TINY, ["optimizer.lr=3e-2", "train.steps=10", "optimizer.nesterov=false",
                             "model.yarn.factor=2", "optimizer.ns_coefficients=[1,2,3]",
                             "data.prefix=", "name=other"])
    assert cfg.optimizer.lr == 3e-2 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 10 and cfg.optimizer.nesterov is False
    # yarn is null in the file: a nested key starts it from its defaults.
    assert cfg.model.yarn == YarnConfig(factor=2.0)
    assert cfg.optimizer.ns_coefficients == (1.0, 2.0, 3.0)
    assert (cfg.data.prefix, cfg.name) == ("", "other")
    with_yarn = write(tmp_path, "model: {yarn: {factor: 4.0}}\nparallel: {dp: 2}\n")
    cleared = load_config(with_yarn, ["model.yarn=null", "parallel.dp=null"])
    assert cleared.model.yarn is None and cleared.parallel.dp is None


def test_override_with_unknown_key_names_the_override():
    message = error_of(TINY, ("optimizer.lrr=3",))
    assert message.startswith(
        "--set optimizer.lrr=3: unknown key optimizer.lrr; known keys of optimizer: lr, min_lr,")


@pytest.mark.parametrize("override, expected", [
    ("train.steps=ten", "--set train.steps=ten: train.steps must be an int, got 'ten' (str)."),
    ("train.steps", "--set train.steps: expected dotted.key=value"),
    ("optimizer.lr.x=1", "--set optimizer.lr.x=1: optimizer.lr is a value, not a section"),
    ("nonsense.key=1", "--set nonsense.key=1: unknown key nonsense; known top-level keys: name, model,"),
    ("optimizer.ns_coefficients=[1, 2", "--set optimizer.ns_coefficients=[1, 2: the value"),
    ("model.yarn.factor=big", "--set model.yarn.factor=big: model.yarn.factor must be a float"),
])
def test_bad_overrides_name_the_override(override, expected):
    assert expected in error_of(TINY, (override,))


# ---- strict loading ------------------------------------------------------------------------------


def test_unknown_key_names_file_key_and_known_keys(tmp_path):
    path = write(tmp_path, "optimizer:\n  lrr: 1.0\n")
    assert error_of(path).startswith(
        f"{path}: unknown key optimizer.lrr; known keys of optimizer: lr, min_lr, weight_decay,")
    path = write(tmp_path, "modle: {}\n")
    assert f"{path}: unknown key modle; known top-level keys: name, model," in error_of(path)
    path = write(tmp_path, "model: {yarn: {factr: 2}}\n")
    assert f"{path}: unknown key model.yarn.factr; known keys of model.yarn: factor," in error_of(path)


@pytest.mark.parametrize("text, expected", [
    ("model: {num_experts: eight}", "model.num_experts must be an int, got 'eight' (str)."),
    ("model: {num_layers: true}", "model.num_layers must be an int, got True (bool)."),
    ("model: {num_layers: 4.0}", "model.num_layers must be an int, got 4.0 (float)."),
    ("optimizer: {lr: true}", "optimizer.lr must be a float, got True (bool)."),
    ("optimizer: {lr: fast}", "optimizer.lr must be a float, got 'fast' (str)."),
    ("optimizer: {nesterov: 1}", "optimizer.nesterov must be true or false, got 1 (int)."),
    ("parallel: {device: 1}", "parallel.device must be a string, got 1 (int)."),
    ("parallel: {pp: null}", "parallel.pp must be an int, got null."),
    ("parallel: {dp: two}", "parallel.dp must be an int or null, got 'two' (str)."),
    ("optimizer: {ns_coefficients: [1, 2]}", "optimizer.ns_coefficients must be a list of 3 floats"),
    ("optimizer: {ns_coefficients: [1, x, 2]}", "optimizer.ns_coefficients[1] must be a float"),
    ("model: {yarn: 32}", "model.yarn must be a mapping or null, got 32 (int)."),
    ("model: 5", "model must be a mapping, got 5 (int)."),
    ("name: 7", "name must be a string, got 7 (int)."),
])
def test_wrong_type_names_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    assert error_of(path).startswith(f"{path}: {expected}")


def test_floats_accept_ints_and_exponent_strings(tmp_path):
    cfg = load_config(write(tmp_path, "optimizer: {lr: 1e-3, min_lr: 0, weight_decay: 1}\n"))
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay) == (1e-3, 0.0, 1.0)
    assert all(type(v) is float for v in (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay))


def test_file_level_errors(tmp_path):
    assert error_of(tmp_path / "absent.yaml") == f"{tmp_path / 'absent.yaml'}: no such config file."
    path = write(tmp_path, "model:\n  num_layers: 3\n  num_layers: 4\n")
    assert error_of(path).startswith(
        f"{path}: not valid YAML: the key 'num_layers' is written twice at line 3")
    path = write(tmp_path, "model: [unclosed\n")
    assert error_of(path).startswith(f"{path}: not valid YAML:")
    assert error_of(tmp_path).startswith(f"{tmp_path}: the config file cannot be read (")
    path = write(tmp_path, "- a list\n")
    assert error_of(path) == f"{path}: the file must be a mapping of config sections, got ['a list'] (list)."


# ---- values that do not fit --------------------------------------------------------------------

VALUE_RULES = [
    (["model.experts_per_token=9"], ["model.experts_per_token (9)", "model.num_experts (8)"]),
    (["model.experts_per_token=0"], ["model.experts_per_token must be at least 1, got 0"]),
    (["model.first_dense_layers=5"], ["model.first_dense_layers (5)", "model.num_layers (4)"]),
    (["model.num_shared_experts=-1"], ["model.num_shared_experts must be at least 0, got -1"]),
    (["model.qk_rope_head_dim=7"], ["model.qk_rope_head_dim must be even", "got 7"]),
    (["model.hidden_size=0"], ["model.hidden_size must be at least 1, got 0"]),
    (["model.q_lora_rank=0"], ["model.q_lora_rank must be at least 1, got 0"]),
    (["model.kv_lora_rank=-2"], ["model.kv_lora_rank must be at least 1, got -2"]),
    (["model.rms_norm_eps=0"], ["model.rms_norm_eps must be greater than 0, got 0.0"]),
    (["model.expert_impl=triton"], ["model.expert_impl must be one of grouped_mm, loop, got 'triton'"]),
    (["model.yarn.factor=0.5"], ["model.yarn.factor must be at least 1", "got 0.5"]),
    (["parallel.pp=0"], ["parallel.pp must be at least 1, got 0"]),
    (["parallel.dp=0"], ["parallel.dp must be at least 1 or null, got 0"]),
    (["parallel.rank_order=ep,pp"], ["parallel.rank_order must name each of ep, pp, dp once", "'ep,pp'"]),
    (["parallel.rank_order=ep,ep,dp"], ["parallel.rank_order", "'ep,ep,dp'"]),
    (["parallel.schedule=gpipe"], ["parallel.schedule must be one of interleaved_1f1b,", "'gpipe'"]),
    (["parallel.device=tpu"], ["parallel.device must be one of cpu, cuda, auto, got 'tpu'"]),
    (["parallel.ep=3"], ["model.num_experts (8)", "parallel.ep (3)", "nearest ep that fits is 2 or 4"]),
    (["parallel.pp=4", "parallel.vp=2"], ["model.num_layers (4)", "parallel.pp 4 x parallel.vp 2 = 8"]),
    (["optimizer.lr=0"], ["optimizer.lr must be greater than 0, got 0.0"]),
    (["optimizer.lr=.nan"], ["optimizer.lr must be a finite number, got nan"]),
    (["optimizer.lr=1e-3", "optimizer.min_lr=2e-3"], ["optimizer.min_lr (0.002)", "optimizer.lr (0.001)"]),
    (["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay must be at least 0, got -0.1"]),
    (["optimizer.muon_momentum=1"], ["optimizer.muon_momentum must be in [0, 1), got 1.0"]),
    (["optimizer.ns_steps=0"], ["optimizer.ns_steps must be at least 1, got 0"]),
    (["optimizer.qk_clip_tau=0"], ["optimizer.qk_clip_tau must be greater than 0, got 0.0"]),
    (["optimizer.warmup_steps=-1"], ["optimizer.warmup_steps must be at least 0, got -1"]),
    (["optimizer.adam_beta1=1"], ["optimizer.adam_beta1 must be in [0, 1), got 1.0"]),
    (["optimizer.adam_beta2=-0.1"], ["optimizer.adam_beta2 must be in [0, 1), got -0.1"]),
    (["data.seq_len=512"],
     ["data.seq_len (512)", "model.max_position_embeddings (256)", "model.yarn is null"]),
    (["model.yarn={factor: 2, original_max_position_embeddings: 64}", "data.seq_len=256"],
     ["data.seq_len (256)", "model.yarn.original_max_position_embeddings (64)", "= 128"]),
    (["train.global_batch_tokens=3000"],
     ["train.global_batch_tokens (3000)", "data.seq_len 64 x train.micro_batch_size 2",
      "= 256 tokens", "nearest valid values are 2816 or 3072"]),
    (["train.global_batch_tokens=100"], ["train.global_batch_tokens (100)", "nearest valid values are 256"]),
    (["train.param_dtype=float16"], ["train.param_dtype must be one of float32, bfloat16, got 'float16'"]),
    (["logging.log_every=0"], ["logging.log_every must be at least 1, got 0"]),
    (["checkpoint.keep_last=0"], ["checkpoint.keep_last must be at least 1, got 0"]),
]


@pytest.mark.parametrize("overrides, expected", VALUE_RULES, ids=[" ".join(o) for o, _ in VALUE_RULES])
def test_value_rules_name_file_keys_and_values(overrides, expected):
    message = error_of(TINY, tuple(overrides))
    assert message.startswith(f"{TINY} with --set {' --set '.join(overrides)}: ")
    for part in expected:
        assert part in message
    assert message.endswith(".") and message.count("\n") == 0


def test_value_rules_accept_their_boundaries():
    cfg = load_config(TINY, ["model.experts_per_token=8", "model.first_dense_layers=4",
                             "model.num_shared_experts=0", "optimizer.min_lr=1e-2",
                             "optimizer.muon_momentum=0", "data.seq_len=256",
                             "train.global_batch_tokens=1024"])
    assert cfg.model.num_moe_layers == 0
    yarn = load_config(TINY, ["model.yarn={factor: 2, original_max_position_embeddings: 256}",
                              "data.seq_len=512", "train.global_batch_tokens=4096"])
    assert yarn.model.yarn.factor == 2.0


def test_dp_null_checks_the_batch_when_the_world_is_known():
    moonlight = CONFIGS / "moonlight_16b_a3b.yaml"
    # At load time dp is unknown, but any dp needs whole micro-batches on the 8 EP ranks.
    message = error_of(moonlight, ("train.global_batch_tokens=8192",))
    assert "train.global_batch_tokens (8192)" in message
    assert "parallel.ep 8 x dp 1 (the least; parallel.dp is null) = 65536 tokens" in message
    cfg = load_config(moonlight, ["train.global_batch_tokens=196608"])
    assert validate_world(cfg, 8, "m") == 1
    batch = r"m: train.global_batch_tokens \(196608\) .* x dp 2 = 131072 tokens"
    with pytest.raises(ConfigError, match=batch):
        validate_world(cfg, 16, "m")
    tiny = load_config(TINY, ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"])
    fixed_dp = r"parallel.dp 1 = 1 ranks, but the world has 4; set parallel.dp to 4 or null"
    with pytest.raises(ConfigError, match=fixed_dp):
        validate_world(tiny, 4, "t")


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^<run args>: model.num_layers must be an int"):
        config_from_dict({"model": {"num_layers": "3"}}, "<run args>")
    assert config_from_dict({}, "<run args>") == JobConfig()


@pytest.mark.parametrize("layers", ["[1,1,1]", "[2,0,1,1]", "[1,1,1,2]", "[2,2,1,-1]"])
def test_stage_layers_must_cover_every_stage_and_layer(layers):
    overrides = ["model.num_layers=4", "parallel.pp=2", "parallel.vp=2", "parallel.dp=null",
                 f"parallel.stage_layers={layers}"]
    with pytest.raises(ConfigError, match=r"parallel.stage_layers .* = 4 stages at least one layer \(the last may hold only the head\) and add up to model.num_layers 4"):
        load_config(TINY, overrides)
    load_config(TINY, overrides[:-1] + ["parallel.stage_layers=[1,1,1,1]"])
    load_config(TINY, overrides[:-1] + ["parallel.stage_layers=[2,1,1,0]"])


@pytest.mark.parametrize("value", ["-1.0", "lots", "Auto"])
def test_a_bad_offload_budget_is_refused(value):
    with pytest.raises(ConfigError, match=r"memory.activation_offload_budget_gib must be a number of GiB of at least 0, "
                                          r"\"auto\" or null, got "):
        load_config(TINY, ["memory.activation_offload=true", f"memory.activation_offload_budget_gib={value}"])


def test_the_offload_budget_is_a_number_auto_or_null():
    def budget(text):
        return load_config(TINY, [f"memory.activation_offload_budget_gib={text}"]).memory.activation_offload_budget_gib

    assert budget("2.5") == 2.5 and budget("3") == 3.0 and budget("auto") == "auto" and budget("null") is None
    with pytest.raises(ConfigError, match=r"memory.activation_offload_budget_gib must be a float or a string or null, "
                                          r"got \[1\] \(list\)"):
        budget("[1]")

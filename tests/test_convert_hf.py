"""Importing the released Kimi-K2 format: FP8 block weights, refusals, and every config field compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_files import write_k2_format
from k2train.config.load import load_config
from k2train.model import K2Model
from k2train.model.hf_names import hf_config_dict, to_hf_state_dict
from launch.cli import main
from parallel.checkpoint.checkpointer import MANIFEST, CheckpointError, latest_checkpoint
from parallel.checkpoint.metadata import METADATA_JSON
from parallel.checkpoint.hf_config import FUNCTION_FIELDS, YARN_FIELDS, check_hf_config
from parallel.checkpoint.hf_fp8 import dequantize_fp8_block, e4m3_error_bound, quantize_fp8_block, scale_name

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
ONE = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_fp8_block_dequantisation_is_the_release_formula_and_within_the_e4m3_bound():
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # ragged blocks, columns of very different size
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2) and scale_inv.dtype == torch.float32
    got = dequantize_fp8_block(q, scale_inv, torch.float32)
    blockwise = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert torch.equal(got, q.float() * blockwise)
    assert ((got - w).abs() <= e4m3_error_bound(w, scale_inv)).all()
    # Rows read on their own (a row block of a large tensor) dequantise to the same values.
    rows = dequantize_fp8_block(q[130:290], scale_inv[1:3], torch.bfloat16, row_start=130)
    assert torch.equal(rows, got[130:290].to(torch.bfloat16))


def test_fp8_release_format_imports_exactly(tmp_path):
    from parallel.checkpoint.convert import load_whole_model

    cfg = load_config(TINY, [*ONE, "optimizer.adamw_block_elements=2048"])
    model = K2Model(cfg.model, seed=5)
    written = write_k2_format(model, tmp_path / "hf")
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, "optimizer.adamw_block_elements=2048"),
                 "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = load_whole_model(cfg, tmp_path / "ckpt")
    for name, got in to_hf_state_dict(loaded.state_dict()).items():
        stored = written[name]
        if scale_name(name) in written:
            want = dequantize_fp8_block(stored, written[scale_name(name)], got.dtype)
            original = to_hf_state_dict(model.state_dict())[name]
            assert ((got - original).abs() <= e4m3_error_bound(original, written[scale_name(name)])).all(), name
        else:
            want = stored.to(got.dtype)
        assert torch.equal(got, want), name


def test_an_imported_checkpoint_carries_the_json_index_and_export_unpickles_nothing(tmp_path, capsys):
    cfg = load_config(TINY, ONE)
    write_k2_format(K2Model(cfg.model, seed=3), tmp_path / "hf")
    assert main(["convert", "--config", str(TINY), *_sets(*ONE), "--from-hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "ckpt")]) == 0
    step = latest_checkpoint(tmp_path / "ckpt")
    assert (step / METADATA_JSON).is_file()
    # Without the JSON index only the pickle is left: export refuses it unless the user trusts it.
    (step / METADATA_JSON).unlink()
    manifest = json.loads((step / MANIFEST).read_text())
    del manifest["files"][METADATA_JSON]
    (step / MANIFEST).write_text(json.dumps(manifest))
    export = ["convert", "--config", str(TINY), *_sets(*ONE), "--from-checkpoint", str(tmp_path / "ckpt")]
    assert main([*export, "--out", str(tmp_path / "refused")]) == 2
    assert f"{METADATA_JSON} is missing" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main([*export, "--trust-checkpoint", "--out", str(tmp_path / "trusted")]) == 0
    assert (tmp_path / "trusted" / "model.safetensors.index.json").is_file()


def _corrupt(directory: Path, how: str) -> str:
    """Damage one tensor of a written directory; returns the tensor or file the refusal must name."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    file = directory / index[name]
    if how == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) - 100])
        return file.name
    tensors = load_file(str(file))
    if how == "missing scale":
        del tensors[scale_name(name)]
    elif how == "wrong shape":
        tensors[name] = tensors[name][:-1].contiguous()
    elif how == "wrong dtype":
        tensors[name] = tensors[name].to(torch.float8_e5m2)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["truncated", "missing scale", "wrong shape", "wrong dtype"])
def test_a_damaged_checkpoint_is_refused_in_one_sentence_and_nothing_is_published(tmp_path, capsys, how):
    cfg = load_config(TINY, ONE)
    write_k2_format(K2Model(cfg.model, seed=1), tmp_path / "hf")
    named = _corrupt(tmp_path / "hf", how)
    if how == "missing scale":  # the index must not list a scale the file no longer holds
        index_path = tmp_path / "hf" / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        del index["weight_map"][scale_name(named)]
        index_path.write_text(json.dumps(index))
    assert main(["convert", "--config", str(TINY), *_sets(*ONE), "--from-hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2train: error:") and named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ckpt" / "latest").exists()
    assert not [p for p in (tmp_path / "ckpt").glob("step_*") if ".partial-" not in p.name]


def _function_changes() -> list[tuple[str, object]]:
    """(config.json field, another value) for every function-changing field."""
    values = {"rms_norm_eps": 1e-5, "routed_scaling_factor": 2.5, "norm_topk_prob": False, "n_group": 8,
              "topk_group": 4, "scoring_func": "softmax", "topk_method": "greedy", "hidden_act": "gelu",
              "attention_bias": True, "tie_word_embeddings": True}
    assert values.keys() == FUNCTION_FIELDS.keys()
    return [*values.items(), ("rope_theta", 10000.0)]


@pytest.mark.parametrize("field,value", _function_changes())
def test_every_function_changing_field_is_refused_naming_it_both_values_and_the_file(tmp_path, field, value):
    cfg = load_config(TINY, ONE)
    ours = hf_config_dict(cfg.model)[field]
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg.model) | {field: value}))
    with pytest.raises(CheckpointError) as err:
        check_hf_config(tmp_path, cfg.model)
    message = str(err.value)
    assert f"{tmp_path / 'config.json'} has {field}={value!r}" in message
    assert f"but the config describes {ours!r}" in message
    check_hf_config(tmp_path, cfg.model, accepted=(field,))  # a deliberate choice converts


@pytest.mark.parametrize("field", YARN_FIELDS)
@pytest.mark.parametrize("spelling", ["transformers 4", "transformers 5"])
def test_rope_and_yarn_are_compared_in_both_spellings(tmp_path, field, spelling):
    yarn = ["model.yarn={factor: 32.0, original_max_position_embeddings: 64, beta_fast: 4.0, beta_slow: 1.0, "
            "mscale: 1.0, mscale_all_dim: 1.0}"]
    cfg = load_config(TINY, [*ONE, *yarn])
    config = hf_config_dict(cfg.model)
    rope = dict(config.pop("rope_scaling"), rope_type="yarn")
    rope.pop("type")
    rope[field] = rope[field] * 2
    if spelling == "transformers 5":
        config["rope_parameters"] = rope | {"rope_theta": config.pop("rope_theta")}
        where = "rope_parameters"
    else:
        config["rope_scaling"] = rope
        where = "rope_scaling"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"has {where}\.{field}={rope[field]!r}, but the config describes"):
        check_hf_config(tmp_path, cfg.model)
    fixed = load_config(TINY, [*ONE, *yarn, f"model.yarn.{field}={rope[field]}"])
    check_hf_config(tmp_path, fixed.model)  # --set makes this run's model the checkpoint's


def test_rope_theta_nested_by_transformers_5_and_the_set_that_fixes_it(tmp_path):
    cfg = load_config(TINY, ONE)
    config = hf_config_dict(cfg.model)
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has rope_parameters\.rope_theta=10000\.0, but the config describes "
                                              r"50000\.0; set model\.rope_theta=10000\.0 with --set"):
        check_hf_config(tmp_path, cfg.model)
    check_hf_config(tmp_path, load_config(TINY, [*ONE, "model.rope_theta=10000.0"]).model)
    # A file that leaves rope_theta out means transformers' default, 10000: refused as well.
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has rope_theta=10000\.0"):
        check_hf_config(tmp_path, cfg.model)


def test_other_quantisation_is_refused(tmp_path):
    cfg = load_config(TINY, ONE)
    config = hf_config_dict(cfg.model) | {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weight_block_size \[128, 128\]"):
        check_hf_config(tmp_path, cfg.model)

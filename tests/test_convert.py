"""`k2train convert`: a checkpoint to HF safetensors that transformers loads, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.cli import main

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
ONE = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _logits_of_checkpoint(root: Path, tokens: torch.Tensor) -> torch.Tensor:
    from k2train.config.load import load_config
    from parallel.checkpoint.convert import load_whole_model

    model = load_whole_model(load_config(TINY, ONE), root)
    with torch.no_grad():
        return model(tokens).output


def test_checkpoint_to_hf_and_back(tmp_path):
    from k2train.data.prepare import prepare_dataset

    prepare_dataset(sorted((ROOT / "k2train" / "model").glob("*.py")), tmp_path / "corpus", "byte")
    train = _sets(*ONE, f"data.prefix={tmp_path / 'corpus'}", f"logging.run_root={tmp_path / 'runs'}",
                  "logging.wandb=false", "logging.plots=false", "logging.progress_bar=false", "train.steps=2",
                  "checkpoint.every_steps=2", f"checkpoint.dir={tmp_path / 'ckpt'}", "train.global_batch_tokens=512")
    assert main(["train", "--config", str(TINY), *train]) == 0
    # Export: a trained checkpoint -> HF files with an index that transformers loads.
    assert main(["convert", "--config", str(TINY), *_sets(*ONE), "--from-checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "hf")]) == 0
    assert "weight_map" in json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, 257, (2, 24))
    ours = _logits_of_checkpoint(tmp_path / "ckpt", tokens)
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
    # Import: a checkpoint saved by transformers itself -> ours, same logits.
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
        theirs = hf(tokens).logits
    hf.save_pretrained(tmp_path / "hf-saved")
    assert main(["convert", "--config", str(TINY), *_sets(*ONE), "--from-hf", str(tmp_path / "hf-saved"),
                 "--out", str(tmp_path / "imported")]) == 0
    ours = _logits_of_checkpoint(tmp_path / "imported", tokens)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_an_hf_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"hidden_size": 128}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert main(["convert", "--config", str(TINY), *_sets(*ONE), "--from-hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "has hidden_size=128, but the config describes hidden_size=64" in capsys.readouterr().err


def test_row_blocked_checkpoint_keys_are_the_trainers_and_round_trip(tmp_path):
    """With optimizer.adamw_block_elements small, convert writes and reads the embedding and head as
    the trainer's row-block keys (one source: parallel/zero1/ownership.py), and HF -> checkpoint -> model
    gives back every weight."""
    from k2train.config.load import load_config
    from k2train.model import K2Model
    from parallel.checkpoint.checkpointer import Checkpointer
    from parallel.checkpoint.convert import export_hf, import_hf, load_whole_model, model_views
    from parallel.zero1.optimizer import ShardedMuonClip

    cfg = load_config(TINY, [*ONE, "optimizer.adamw_block_elements=2048"])
    model = K2Model(cfg.model, seed=3)
    m = cfg.model
    trainer = ShardedMuonClip(list(model.named_parameters()), 0, None, None, cfg.optimizer,
                              (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim), distributed=False)
    theirs = {k: v for k, v in trainer.checkpoint_tensors().items() if k.startswith("model/")}
    ours = {k: v for k, v in model_views(model, cfg.optimizer.adamw_block_elements).items() if k.startswith("model/")}
    assert ours.keys() == theirs.keys() and "model/lm_head.weight[rows 480:512]" in ours
    for key, view in ours.items():  # the same storage: views of the model's parameters
        assert view.data_ptr() == theirs[key].data_ptr() and view.shape == theirs[key].shape, key
    saver = Checkpointer(cfg, tmp_path / "saved", rank=0, distributed=False)
    saver.save(0, model_views(model, cfg.optimizer.adamw_block_elements), sampler={}, layout={"world_size": 1})
    saver.wait()
    export_hf(cfg, tmp_path / "saved", tmp_path / "hf", shard_bytes=50_000, working_set_bytes=20_000)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    loaded = load_whole_model(cfg, import_hf(cfg, tmp_path / "hf", tmp_path / "ckpt"))
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, want), name

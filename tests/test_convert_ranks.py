"""`k2train convert --from-hf` as every rank of a layout, and the released-weights sequence end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hf_files import write_k2_format
from k2train.config.load import load_config
from k2train.model import K2Model
from launch.cli import main
from multiproc import run_world
from parallel.checkpoint.checkpointer import latest_checkpoint
from parallel.checkpoint.metadata import JsonReader

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
ONE = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"]
BLOCKS = "optimizer.adamw_block_elements=2048"  # the embedding and head in row blocks, spread over owners


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def import_as_rank(payload: dict) -> tuple[int, list, list]:
    """One rank of the launched layout imports; returns its exit code, what it read and its keys."""
    from parallel.checkpoint import hf_source
    from parallel.checkpoint.hf_import import rank_targets
    from parallel.layout import layout_for

    reads = []
    read = hf_source.HFSource.read

    def logged(self, name, dtype, rows=None):
        reads.append((name, rows))
        return read(self, name, dtype, rows)

    hf_source.HFSource.read = logged
    code = main(["convert", "--config", str(TINY), *_sets(BLOCKS), "--from-hf", payload["hf"], "--out", payload["out"]])
    cfg = load_config(TINY, [BLOCKS])
    owned = [t.key for t in rank_targets(cfg, layout_for(cfg, 8), int(os.environ["RANK"]))]
    return code, reads, owned


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    stored = JsonReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()
               if k.startswith(("model/", "buffer/"))}
    dcp.load(tensors, storage_reader=JsonReader(str(path)), no_dist=True)
    return tensors


def test_per_rank_import_under_pp2_ep2_dp2_equals_the_single_process_import(tmp_path):
    cfg = load_config(TINY, [*ONE, BLOCKS])
    write_k2_format(K2Model(cfg.model, seed=7), tmp_path / "hf")
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, BLOCKS), "--from-hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "single")]) == 0
    ranks = run_world(8, "test_convert_ranks:import_as_rank", dict(hf=str(tmp_path / "hf"), out=str(tmp_path / "ranked")))
    assert [code for code, _, _ in ranks] == [0] * 8
    single = _all_tensors(latest_checkpoint(tmp_path / "single"))
    ranked = _all_tensors(latest_checkpoint(tmp_path / "ranked"))
    assert single.keys() == ranked.keys()
    for key, want in single.items():
        assert torch.equal(ranked[key], want), key
    # Each rank read exactly the tensors (expert matrices, row blocks) of the keys it owns, once.
    reads = [read for _, rank_reads, _ in ranks for read in rank_reads]
    assert len(reads) == len(set(reads)) == len(single)
    assert sorted(key for _, _, owned in ranks for key in owned) == sorted(single)
    assert all(len(rank_reads) == len(owned) for _, rank_reads, owned in ranks)
    # Every rank wrote its own DCP files.
    written = {p.name.split("_")[2] for p in latest_checkpoint(tmp_path / "ranked").glob("__*_*.distcp")}
    assert written == {str(r) for r in range(8)}


transformers = pytest.importorskip("transformers")


def test_from_the_released_weights_to_a_checkpoint_and_back_to_hf(tmp_path, capsys):
    """The README's sequence on a K2-shaped model in the release's format: FP8 shards with scales,
    index, config.json -> checkpoint -> bf16 HF directory that transformers loads, same logits."""
    from k2train.model.hf_names import to_hf_state_dict
    from parallel.checkpoint.convert import load_whole_model

    bf16 = "train.param_dtype=bfloat16"
    # The release extends the context with YaRN (factor 32 from 4096); here 4 from 64.
    yarn = ("model.yarn={factor: 4.0, original_max_position_embeddings: 64, beta_fast: 1.0, beta_slow: 1.0, "
            "mscale: 1.0, mscale_all_dim: 1.0}")
    cfg = load_config(TINY, [*ONE, bf16, yarn])
    write_k2_format(K2Model(cfg.model, seed=11), tmp_path / "Kimi-K2-Base", shards=4)
    # The pre-training config has plain RoPE: converting under it would change the model, so it is refused.
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, bf16), "--from-hf", str(tmp_path / "Kimi-K2-Base"),
                 "--out", str(tmp_path / "ckpt")]) == 2
    assert not (tmp_path / "ckpt").exists()
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, bf16, yarn), "--from-hf",
                 str(tmp_path / "Kimi-K2-Base"), "--out", str(tmp_path / "ckpt")]) == 0
    # Exporting it under the plain-RoPE config would write a config.json of another model: refused.
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, bf16), "--from-checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "hf-plain")]) == 2
    assert "was saved with model.yarn={'factor': 4.0" in capsys.readouterr().err
    assert not (tmp_path / "hf-plain").exists()
    assert main(["convert", "--config", str(TINY), *_sets(*ONE, bf16, yarn), "--from-checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "hf-bf16"), "--shard-mb", "0.1", "--working-set-mb", "0.05"]) == 0
    assert len(list((tmp_path / "hf-bf16").glob("model-*-of-*.safetensors"))) > 1
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "hf-bf16", attn_implementation="eager", output_loading_info=True, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_whole_model(cfg, tmp_path / "ckpt")
    theirs_state = hf.state_dict()
    shared = [name for name in to_hf_state_dict(ours.state_dict()) if name in theirs_state]
    assert "model.layers.0.self_attn.q_b_proj.weight" in shared  # transformers 5 fuses the experts' names
    for name in shared:  # the bf16 weights travel bit for bit
        assert torch.equal(theirs_state[name], to_hf_state_dict(ours.state_dict())[name]), name
    tokens = torch.randint(0, 257, (2, 100))  # past the original 64 positions: YaRN matters
    with torch.no_grad():
        mine = ours.float()(tokens).output
        theirs = hf.float().eval()(tokens).logits
    assert ((mine - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5

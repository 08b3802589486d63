"""Checkpoints: exact resume, resharding across layouts, atomicity, integrity, retention."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from multiproc import run_world

ROOT = Path(__file__).parents[1]
BASE = [
    "model.num_layers=4", "model.num_experts=8", "data.seq_len=16", "train.micro_batch_size=1",
    "train.global_batch_tokens=256", "optimizer.warmup_steps=1", "logging.wandb=false",
    "logging.plots=false", "logging.progress_bar=false", "checkpoint.every_steps=1",
]
ONE = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"]
WIDE = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=2", "parallel.dp=2"]
OTHER = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=4", "parallel.dp=2"]
# The resharding runs cut the tiny model's 512 x 64 embedding and head into AdamW row blocks of 32
# rows, each its own item and key, owned by different ranks in each layout.
BLOCKS = "optimizer.adamw_block_elements=2048"


def train_job(payload: dict) -> None:
    """One rank of a training run (the launcher's code path)."""
    from k2train.config.load import load_config
    from parallel.trainer import run_training
    from launch.env import launch_env

    run_training(load_config(ROOT / "configs" / "k2_tiny.yaml", payload["overrides"]), launch_env())


def run(tmp: Path, name: str, layout: list[str], steps: int, ckpt: Path, world: int, *extra: str) -> list[dict]:
    overrides = [*BASE, *layout, f"data.prefix={tmp / 'data' / 'corpus'}", f"logging.run_root={tmp / 'runs'}",
                 f"logging.run_name={name}", f"train.steps={steps}", f"checkpoint.dir={ckpt}", *extra]
    if world == 1:
        train_job(dict(overrides=overrides))
    else:
        run_world(world, "test_checkpoint:train_job", dict(overrides=overrides))
    lines = (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()[1:]
    return [json.loads(line) for line in lines]


def copy_up_to_step_2(source: Path, target: Path) -> None:
    """A copy of a 3-step run's checkpoints without step 3, `latest` at step 2: a run that stopped there."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "step_00000003")
    (target / "latest").write_text("step_00000002")


def model_tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if k.startswith(("model/", "optim/", "buffer/"))}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    from k2train.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("ckpt")
    (root / "data").mkdir()
    prepare_dataset(sorted((ROOT / "k2train").rglob("*.py")), root / "data" / "corpus", "byte")
    return root


def test_resume_is_bit_for_bit(tmp):
    whole = run(tmp, "whole", ONE, 4, tmp / "c-whole", 1)
    run(tmp, "first", ONE, 2, tmp / "c-split", 1)
    resumed = run(tmp, "second", ONE, 4, tmp / "c-split", 1)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]
    a = model_tensors(tmp / "c-whole" / "step_00000004", tmp)
    b = model_tensors(tmp / "c-split" / "step_00000004", tmp)
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_multi_process_resume_is_bit_for_bit(tmp):
    layout = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=2", "parallel.dp=1"]
    whole = run(tmp, "w8", layout, 3, tmp / "c-w8", 4)
    # The run's step-2 checkpoint (it saves every step) stands for a run that stopped there.
    copy_up_to_step_2(tmp / "c-w8", tmp / "c-a8")
    resumed = run(tmp, "b8", layout, 3, tmp / "c-a8", 4)
    assert [r["loss"] for r in resumed] == [whole[2]["loss"]]
    a, b = model_tensors(tmp / "c-w8" / "step_00000003", tmp), model_tensors(tmp / "c-a8" / "step_00000003", tmp)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# Another split of the layers over the stages: the last stage holds only the head (parallel/pipeline/split.py).
RESPLIT = ["parallel.pp=2", "parallel.vp=2", "parallel.ep=1", "parallel.dp=1", "parallel.stage_layers=[2,1,1,0]"]


@pytest.mark.parametrize("target,world", [(ONE, 1), (OTHER, 8), (RESPLIT, 2)],
                         ids=["to-one-process", "to-pp1xep4xdp2", "to-pp2xvp2-another-split"])
def test_a_checkpoint_reshards_to_another_layout(tmp, target, world):
    """Saved under PP2xVP2xEP2xDP2, loaded under another layout: training continues with the same loss.
    The embedding and head are row blocks with other owners in each layout."""
    _reshard_source(tmp)
    reference = [json.loads(line) for line in (tmp / "runs" / "src" / "metrics.jsonl").read_text().splitlines()[1:]]
    name = f"dst{world}"
    # Only step 2, so the new layout resumes there and recomputes step 3.
    copy_up_to_step_2(tmp / "c-reshard-src", tmp / f"c-{name}")
    continued = run(tmp, name, target, 3, tmp / f"c-{name}", world, BLOCKS)
    assert [r["step"] for r in continued] == [3]
    assert continued[0]["loss"] == pytest.approx(reference[2]["loss"], rel=1e-6)
    # Step 3's update used the resharded optimizer state: the new parameters and states equal the
    # source's up to bf16 Newton-Schulz and summation order (under 1e-3 here; AdamW moments loaded
    # into the wrong rows, or left fresh, move the embedding and head by about 20%).
    src = model_tensors(tmp / "c-reshard-src" / "step_00000003", tmp)
    dst = model_tensors(tmp / f"c-{name}" / "step_00000003", tmp)
    assert src.keys() == dst.keys()
    for key in src:  # rows of unused token ids have zero moments: those must stay exactly zero
        error, scale = (dst[key].float() - src[key].float()).norm().item(), src[key].float().norm().item()
        assert error <= 1e-2 * scale, f"{key}: error {error:.2e} against norm {scale:.2e}"


def _reshard_source(tmp: Path) -> None:
    if not (tmp / "c-reshard-src").exists():
        run(tmp, "src", WIDE, 3, tmp / "c-reshard-src", 8, BLOCKS)
    keys = model_tensors(tmp / "c-reshard-src" / "step_00000003", tmp)
    for state in ("model", "optim/master", "optim/moment1", "optim/moment2"):
        assert f"{state}/lm_head.weight[rows 480:512]" in keys and f"{state}/lm_head.weight" not in keys, state


def test_a_per_rank_hf_import_writes_the_items_each_trainer_rank_owns(tmp):
    """`convert --from-hf` as rank r of PP2xVP2xEP2xDP2 writes the items whose master weights the
    trainer's rank r keeps: one ownership rule (cost-balanced stage split, ZeRO-1 owners, row
    blocks) for both. Five layers: the balanced split is not the even one."""
    from k2train.config.load import load_config
    from parallel.checkpoint.metadata import METADATA_JSON
    from parallel.checkpoint.hf_import import rank_targets
    from parallel.layout import layout_for

    run(tmp, "owners", WIDE, 1, tmp / "c-owners", 8, BLOCKS, "model.num_layers=5")
    index = json.loads((tmp / "c-owners" / "step_00000001" / METADATA_JSON).read_text())
    owned: dict[int, set[str]] = {}
    for entry in index["storage"]:
        if entry["fqn"].startswith("optim/master/"):
            owned.setdefault(int(entry["file"].split("_")[2]), set()).add(entry["fqn"].removeprefix("optim/master/"))
    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", [*BASE, *WIDE, BLOCKS, "model.num_layers=5"])
    layout = layout_for(cfg, 8)
    for rank in range(8):
        imported = {t.key.removeprefix("model/") for t in rank_targets(cfg, layout, rank) if t.key.startswith("model/")}
        assert imported == owned[rank], rank


def test_another_adamw_block_size_is_refused_by_name(tmp):
    """The keys of a large AdamW parameter follow optimizer.adamw_block_elements: another value names it."""
    from parallel.checkpoint.checkpointer import CheckpointError

    _reshard_source(tmp)
    shutil.copytree(tmp / "c-reshard-src", tmp / "c-blocks")
    with pytest.raises(CheckpointError, match=r"has no model/embed_tokens\.weight\[rows 0:64\] .*saved with "
                                              r"optimizer\.adamw_block_elements=2048, but this run has 4096"):
        run(tmp, "blocks", ONE, 4, tmp / "c-blocks", 1, "optimizer.adamw_block_elements=4096")


def test_retention_keeps_the_last_n(tmp):
    run(tmp, "keep", ONE, 4, tmp / "c-keep", 1, "checkpoint.keep_last=2")
    assert sorted(p.name for p in (tmp / "c-keep").iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (tmp / "c-keep" / "latest").read_text() == "step_00000004"


def crash_during_save(payload: dict) -> None:
    """Train, but die (SIGKILL-like, no cleanup) halfway through writing the second checkpoint."""
    import torch.distributed.checkpoint as dcp

    save = dcp.save
    calls = {"n": 0}

    def dying_save(state, storage_writer, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.makedirs(storage_writer.path, exist_ok=True)
            Path(storage_writer.path, "__0_0.distcp").write_bytes(b"half a file")
            os._exit(9)
        return save(state, storage_writer=storage_writer, **kwargs)

    dcp.save = dying_save
    train_job(payload)


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp):
    ckpt = tmp / "c-crash"
    overrides = [*BASE, *ONE, f"data.prefix={tmp / 'data' / 'corpus'}", f"logging.run_root={tmp / 'runs'}",
                 "logging.run_name=crash", "train.steps=3", f"checkpoint.dir={ckpt}"]
    with pytest.raises(RuntimeError, match="failed"):
        run_world(1, "test_checkpoint:crash_during_save", dict(overrides=overrides))
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert any(".partial-" in p.name for p in ckpt.iterdir())
    resumed = run(tmp, "after-crash", ONE, 3, ckpt, 1)
    assert [r["step"] for r in resumed] == [2, 3]
    assert not any(".partial-" in p.name for p in ckpt.iterdir())


def test_corrupt_missing_and_foreign_checkpoints_are_refused(tmp):
    from parallel.checkpoint.checkpointer import CheckpointError

    run(tmp, "bad", ONE, 1, tmp / "c-bad", 1)
    step = tmp / "c-bad" / "step_00000001"
    shard = next(step.glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its sha256"):
        run(tmp, "bad2", ONE, 2, tmp / "c-bad", 1)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name} is missing from the checkpoint"):
        run(tmp, "bad3", ONE, 2, tmp / "c-bad", 1)
    run(tmp, "good", ONE, 1, tmp / "c-foreign", 1)
    with pytest.raises(CheckpointError, match=r"saved for model.hidden_size=64, but this run has model.hidden_size=32"):
        run(tmp, "foreign", ONE, 2, tmp / "c-foreign", 1, "model.hidden_size=32", "model.moe_intermediate_size=16")


def test_async_save_writes_the_same_checkpoint(tmp):
    run(tmp, "sync", ONE, 3, tmp / "c-sync", 1)
    run(tmp, "async", ONE, 3, tmp / "c-async", 1, "checkpoint.async_save=true")
    a = model_tensors(tmp / "c-sync" / "step_00000003", tmp)
    b = model_tensors(tmp / "c-async" / "step_00000003", tmp)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp / "c-async" / "latest").read_text() == "step_00000003"

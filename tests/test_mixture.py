"""Weighted data mixtures and held-out splits: proportions, exact resume, refusals, re-cutting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from k2train.config.checks import ConfigError
from k2train.config.load import load_config
from k2train.config.schema import DataConfig, MixtureEntry
from k2train.data import IndexedDataset, IndexedDatasetWriter
from k2train.data.errors import DataError
from k2train.data.mixture import build_samplers, held_out_start
from k2train.data.sampler import SequenceSampler

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
SEQ = 8


def write(prefix: Path, documents: list[np.ndarray], dtype=np.int32) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


@pytest.fixture
def sets(tmp_path) -> dict[str, str]:
    """Three datasets whose token values tell them apart: dataset j holds ids in [100 j, 100 j + 90)."""
    rng = np.random.default_rng(0)
    out = {}
    for j, name in enumerate(("web", "code", "math")):
        docs = [100 * j + rng.integers(0, 90, size=int(rng.integers(20, 60))) for _ in range(40 + 20 * j)]
        out[name] = write(tmp_path / name, docs)
    return out


def mixture(sets: dict[str, str], weights=(0.2, 0.3, 0.5), **data) -> DataConfig:
    entries = tuple(MixtureEntry(prefix=sets[n], weight=w, name=n) for n, w in zip(sets, weights))
    return DataConfig(mixture=entries, seq_len=SEQ, seed=7, **data)


def test_proportions_are_within_a_binomial_bound(sets):
    sampler, _ = build_samplers(mixture(sets), vocab_size=512)
    steps, batch = 150, 40
    source = []
    for _ in range(steps):
        inputs, _ = sampler.next_batch(batch)
        datasets = inputs // 100
        # Each sequence comes from one dataset as a whole.
        assert torch.equal(datasets.min(dim=1).values, datasets.max(dim=1).values)
        source += datasets[:, 0].tolist()
    n = steps * batch
    shares = sampler.shares()
    for j, (name, p) in enumerate(zip(sets, (0.2, 0.3, 0.5))):
        observed = source.count(j) / n
        assert shares[name] == observed
        # 4.5 standard deviations of the binomial share: a false alarm about once in 150,000 runs.
        assert abs(observed - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (name, observed, p)


def test_mixture_resume_draws_the_same_batches_and_ranks_tile_the_batch(sets):
    data = mixture(sets)
    whole, _ = build_samplers(data, 512)
    for _ in range(30):  # past several epochs of the smallest dataset
        whole.next_batch(6)
    state = json.loads(json.dumps(whole.state_dict()))  # as it travels in a checkpoint manifest
    expected = [whole.next_batch(6) for _ in range(20)]
    ranks = []
    for rank in range(3):
        resumed, _ = build_samplers(data, 512)
        resumed.load_state_dict(state)
        ranks.append([resumed.next_batch(2, rank=rank, world=3) for _ in range(20)])
    for step, (inputs, labels) in enumerate(expected):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(3)]), inputs)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(3)]), labels)
    assert resumed.state_dict() == whole.state_dict()


def test_a_changed_mixture_is_refused_on_resume(sets):
    sampler, _ = build_samplers(mixture(sets), 512)
    sampler.next_batch(4)
    other, _ = build_samplers(mixture(sets, weights=(0.5, 0.3, 0.2)), 512)
    with pytest.raises(DataError, match="weights"):
        other.load_state_dict(sampler.state_dict())
    single, _ = build_samplers(DataConfig(prefix=sets["web"], seq_len=SEQ, seed=7), 512)
    with pytest.raises(DataError, match="state is of a data.mixture, but this run reads one dataset"):
        single.load_state_dict(sampler.state_dict())
    with pytest.raises(DataError, match="state is of a single dataset, but this run reads data.mixture"):
        sampler.load_state_dict(single.state_dict())


def test_held_out_split_is_at_a_document_boundary_and_restarts(sets):
    data = DataConfig(prefix=sets["web"], seq_len=SEQ, seed=1, valid_fraction=0.1)
    train, valid = build_samplers(data, 512)
    dataset = IndexedDataset(sets["web"])
    cut = held_out_start(dataset, 0.1)
    assert train.end == cut == valid.start and valid.end == dataset.num_tokens
    documents_before = dataset.document_indices[dataset.num_documents - 4]  # 10% of 40 documents
    assert cut == int(dataset.sequence_lengths[:documents_before].sum())
    first = valid.next_batch(3)
    valid.load_state_dict(SequenceSampler(dataset, SEQ, 1, start=cut, stream=valid.stream).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(valid.next_batch(3), first))


def test_a_longer_seq_len_recuts_from_the_same_fraction_of_the_epoch(sets):
    dataset = IndexedDataset(sets["code"])
    short = SequenceSampler(dataset, 8, seed=3)
    half = short.samples_per_epoch // 2
    short.next_batch(short.samples_per_epoch + half)  # epoch 1, half-way
    longer = SequenceSampler(dataset, 32, seed=3)
    longer.load_state_dict(short.state_dict())
    assert longer.samples_per_epoch == (dataset.num_tokens - 1) // 32 < short.samples_per_epoch
    assert (longer.epoch, longer.offset) == (1, half * longer.samples_per_epoch // short.samples_per_epoch)
    inputs, labels = longer.next_batch(2)
    assert inputs.shape == (2, 32) and torch.equal(inputs[:, 1:], labels[:, :-1])


def test_bad_mixtures_are_refused_naming_the_dataset(sets, tmp_path):
    base = [f"data.mixture=[{{prefix: {sets['web']}, name: web}}, {{prefix: {sets['code']}, weight: 0, name: code}}]"]
    with pytest.raises(ConfigError, match=r"data.mixture\[1\] \(dataset 'code'\) has weight 0.0; weights must be positive"):
        load_config(TINY, base)
    with pytest.raises(ConfigError, match="data.prefix .* and data.mixture are both set"):
        load_config(TINY, [f"data.mixture=[{{prefix: {sets['web']}}}]", f"data.prefix={sets['code']}"])
    with pytest.raises(ConfigError, match="both named 'web'"):
        load_config(TINY, [f"data.mixture=[{{prefix: {sets['web']}}}, {{prefix: {sets['code']}, name: web}}]"])
    with pytest.raises(ConfigError, match="dataset 'code' has no valid_prefix"):
        load_config(TINY, [f"data.mixture=[{{prefix: {sets['code']}}}]", "data.valid_fraction=0"])
    # Token ids past the model's vocabulary (a dataset made with another tokenizer).
    with pytest.raises(DataError, match=r"data.mixture\[2\] \(dataset 'math'\): .* outside the model's vocab of 200"):
        build_samplers(mixture({"web": sets["web"], "code": sets["code"], "math": sets["math"]}), vocab_size=200)
    # A dtype that does not hold token ids (float32, code 7), written by another tool.
    floats = write(tmp_path / "floats", [np.arange(40)])
    idx = Path(floats + ".idx").read_bytes()
    Path(floats + ".idx").write_bytes(idx[:17] + bytes([7]) + idx[18:])
    with pytest.raises(DataError, match=r"data.mixture\[1\] \(dataset 'floats'\): .*float32 values"):
        build_samplers(mixture({"web": sets["web"], "floats": floats}, weights=(1, 1)), vocab_size=512)
    # Too little data for one sequence.
    tiny_set = write(tmp_path / "tiny", [np.arange(5)])
    with pytest.raises(DataError, match=r"data.mixture\[1\] \(dataset 'tiny'\): .*5 tokens"):
        build_samplers(mixture({"web": sets["web"], "tiny": tiny_set}, weights=(1, 1)), vocab_size=512)


def _train(tmp_path: Path, name: str, steps: int, ckpt: Path, mix: str) -> list[dict]:
    from parallel.trainer import run_training
    from launch.env import launch_env

    run_training(load_config(TINY, [
        "model.num_layers=2", "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_tokens=128",
        "optimizer.warmup_steps=1", "parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1",
        "logging.wandb=false", "logging.plots=false", "logging.progress_bar=false", "checkpoint.every_steps=1",
        mix, "data.valid_fraction=0.1", "train.eval_every=2", f"train.steps={steps}", f"checkpoint.dir={ckpt}",
        f"logging.run_root={tmp_path / 'runs'}", f"logging.run_name={name}"]), launch_env())
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()[1:]
    return [json.loads(line) for line in lines]


def test_resume_with_a_mixture_is_bit_for_bit(sets, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    mix = f"data.mixture=[{{prefix: {sets['web']}, weight: 3}}, {{prefix: {sets['math']}, weight: 1, name: m}}]"
    whole = _train(tmp_path, "whole", 4, tmp_path / "c-whole", mix)
    _train(tmp_path, "first", 2, tmp_path / "c-split", mix)
    resumed = _train(tmp_path, "second", 4, tmp_path / "c-split", mix)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "data_share", "val_loss"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in whole[2:]], key
    assert set(whole[-1]["data_share"]) == {"web", "m"}
    tensors = []
    for run in ("c-whole", "c-split"):
        dcp_to_torch_save(str(tmp_path / run / "step_00000004"), str(tmp_path / f"{run}.pt"))
        tensors.append(torch.load(tmp_path / f"{run}.pt", weights_only=False))
    a, b = tensors
    assert a["model/embed_tokens.weight"].shape[0] == 512
    for key in a:
        if key.startswith(("model/", "optim/", "buffer/")):
            assert torch.equal(a[key], b[key]), key

"""The data path: Megatron .bin/.idx compatibility both ways, errors, preparation, tokenizers,
the sampler's determinism and resumption, and the default corpus."""

import argparse
import importlib
import json
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from k2train.data import (
    ByteTokenizer,
    DataError,
    IndexedDataset,
    IndexedDatasetWriter,
    SequenceSampler,
    default_corpus_prefix,
    load_tokenizer,
    prepare_dataset,
)
from k2train.data.prepare import token_dtype
from launch.data_cli import add_data_parser

DTYPES = [np.uint16, np.int32]


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's indexed_dataset module: an independent reader and writer of the format."""
    with warnings.catch_warnings():
        # It warns that Transformer Engine and apex are absent; the dataset code needs neither.
        warnings.simplefilter("ignore")
        return importlib.import_module("megatron.core.datasets.indexed_dataset")


def random_documents(count: int, high: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=rng.integers(1, 40)) for _ in range(count)]


def write_ours(prefix: Path, documents, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


# Megatron compatibility --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_what_megatron_writes(tmp_path, megatron, dtype):
    high = 60_000 if dtype == np.uint16 else 2**31 - 1
    documents = random_documents(12, high)
    prefix = str(tmp_path / "mega")
    builder = megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents[:8]:  # one sequence per document
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    # One document of four sequences, as preprocess_data --split-sentences writes.
    builder.add_document(np.concatenate(documents[8:]), [len(d) for d in documents[8:]])
    builder.finalize(prefix + ".idx")

    ours, theirs = IndexedDataset(prefix), megatron.IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype)
    assert len(ours) == len(theirs) == 12
    assert ours.num_documents == 9
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ours[i], doc)
        np.testing.assert_array_equal(ours[i], theirs[i])
    flat = np.concatenate(documents)
    assert ours.num_tokens == len(flat)
    np.testing.assert_array_equal(ours.read_tokens(5, 50), flat[5:55])  # crosses sequences
    np.testing.assert_array_equal(ours[-1], documents[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_megatron_reads_what_we_write(tmp_path, megatron, dtype):
    documents = random_documents(10, 50_000, seed=1)
    prefix = write_ours(tmp_path / "ours", documents, dtype)
    theirs = megatron.IndexedDataset(prefix)
    assert len(theirs) == 10
    np.testing.assert_array_equal(theirs.document_indices, np.arange(11))
    for i, doc in enumerate(documents):
        assert theirs[i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(theirs[i], doc)
    ours = IndexedDataset(prefix)
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ours[i], doc)


def test_writer_publishes_only_complete_files(tmp_path):
    prefix = tmp_path / "sub" / "ds"
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([1, 2, 3])
    assert not any(p.name in ("ds.bin", "ds.idx") for p in prefix.parent.iterdir())
    writer.finalize()
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx"]
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])

    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "failed", np.uint16) as failed:
        failed.add_document([4])
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_writer_rejects_ids_its_dtype_cannot_hold(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        with pytest.raises(DataError, match="70000.*uint16"):
            writer.add_document([1, 70000])
        with pytest.raises(DataError, match="float"):
            writer.add_document([1.5])
    with pytest.raises(DataError, match="float32"):
        IndexedDatasetWriter(tmp_path / "f", np.float32)


# Errors ------------------------------------------------------------------------------------------

def _patch(path: str, offset: int, data: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset:offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def _truncate(path: str, drop: int) -> None:
    Path(path).write_bytes(Path(path).read_bytes()[:-drop])


# Each case damages a good dataset of 3 int32 sequences (lengths 4, 5, 6) and names the file blamed.
CORRUPTIONS = {
    "missing bin": (lambda p: Path(p + ".bin").unlink(), ".bin", "does not exist"),
    "missing idx": (lambda p: Path(p + ".idx").unlink(), ".idx", "does not exist"),
    "bad magic": (lambda p: _patch(p + ".idx", 0, b"NOTMMIDX\x00"), ".idx", "magic"),
    "bad version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), ".idx", "version 2"),
    "unknown dtype": (lambda p: _patch(p + ".idx", 17, bytes([9])), ".idx", "dtype code 9"),
    "float dtype": (lambda p: _patch(p + ".idx", 17, bytes([7])), ".idx", "float32"),
    "short header": (lambda p: Path(p + ".idx").write_bytes(b"MMIDIDX"), ".idx", "header"),
    "truncated idx": (lambda p: _truncate(p + ".idx", 8), ".idx", "needs"),
    "truncated bin": (lambda p: _truncate(p + ".bin", 4), ".bin", "truncated"),
    "foreign bin": (lambda p: Path(p + ".bin").write_bytes(b"\0" * 80), ".bin", "does not belong"),
    "bad pointer": (lambda p: _patch(p + ".idx", 34 + 12 + 8, struct.pack("<q", 12)), ".idx", "sequence 1"),
    "bad length": (lambda p: _patch(p + ".idx", 34, struct.pack("<i", -4)), ".idx", "negative"),
    "bad documents": (lambda p: _patch(p + ".idx", 34 + 12 + 24 + 24, struct.pack("<q", 7)), ".idx",
                      "document indices"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_dataset_is_a_data_error_naming_the_file(tmp_path, case):
    damage, suffix, words = CORRUPTIONS[case]
    prefix = write_ours(tmp_path / "ds", [np.arange(4), np.arange(5), np.arange(6)], np.int32)
    IndexedDataset(prefix)  # intact, it opens
    damage(prefix)
    with pytest.raises(DataError, match=words) as caught:
        IndexedDataset(prefix)
    assert prefix + suffix in str(caught.value)


def test_check_vocab_finds_the_first_out_of_range_id(tmp_path):
    prefix = write_ours(tmp_path / "ds", [[1, 2, 3], [4, 300, 5, 999]], np.int32)
    dataset = IndexedDataset(prefix)
    dataset.check_vocab(1000)
    with pytest.raises(DataError, match="300 at position 4") as caught:
        dataset.check_vocab(257)
    assert prefix + ".bin" in str(caught.value)
    negative = IndexedDataset(write_ours(tmp_path / "neg", [[1, -2]], np.int32))
    with pytest.raises(DataError, match="-2 at position 1"):
        negative.check_vocab(257)
    # uint16 ids are always below a vocab of 65536: nothing to scan.
    IndexedDataset(write_ours(tmp_path / "u16", [[65535]], np.uint16)).check_vocab(65536)


# Tokenizers and preparation ----------------------------------------------------------------------

def test_byte_tokenizer():
    tokenizer = load_tokenizer("byte")
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)
    text = "def f(x):\n    return 'ü→x'\n"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert tokenizer.decode([104, 105, 256, 106]) == "hi<|endoftext|>j"
    with pytest.raises(DataError, match="257"):
        tokenizer.decode([257])


@pytest.fixture
def hf_tokenizer_json(tmp_path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|stop|>"])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_from_path(hf_tokenizer_json):
    tokenizer = load_tokenizer(str(hf_tokenizer_json))
    assert tokenizer.vocab_size == 6 and tokenizer.eod_id == 4
    assert tokenizer.encode("hello world again hello") == [1, 2, 3, 1]
    assert tokenizer.decode([1, 2, 4]) == "hello world <|endoftext|>"
    assert load_tokenizer(str(hf_tokenizer_json.parent)).fingerprint == tokenizer.fingerprint
    (hf_tokenizer_json.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|stop|>"}))
    assert load_tokenizer(str(hf_tokenizer_json)).eod_id == 5
    with pytest.raises(DataError, match="neither 'byte' nor"):
        load_tokenizer(str(hf_tokenizer_json.parent / "missing.json"))


def test_hf_tokenizer_without_end_of_document_token(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(DataError, match="no end-of-document token") as caught:
        load_tokenizer(str(path))
    assert str(path) in str(caught.value)


def test_token_dtype_follows_megatron():
    assert token_dtype(257) == np.uint16 and token_dtype(65_499) == np.uint16
    assert token_dtype(65_500) == np.int32 and token_dtype(163_840) == np.int32


def test_prepare_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n", encoding="utf-8")
    rows = [{"text": "one"}, {"text": ""}, {"text": "twö", "id": 7}]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    summary = prepare_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out" / "ds", "byte")
    assert (summary.documents, summary.skipped_empty, summary.dtype) == (3, 1, "uint16")
    dataset = IndexedDataset(tmp_path / "out" / "ds")
    expected = [b"hello\n", b"one", "twö".encode()]
    assert [list(dataset[i]) for i in range(3)] == [list(e) + [256] for e in expected]
    assert summary.tokens == dataset.num_tokens == sum(len(e) + 1 for e in expected)


def test_prepare_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"line 2 of {bad} has no key 'text'"):
        prepare_dataset([bad], tmp_path / "ds")
    with pytest.raises(DataError, match="missing.txt does not exist"):
        prepare_dataset([tmp_path / "missing.txt"], tmp_path / "ds")
    assert not list(tmp_path.glob("ds*"))  # nothing half-written was published


def test_prepare_command_with_hf_tokenizer(tmp_path, hf_tokenizer_json, capsys):
    (tmp_path / "docs.jsonl").write_text('{"body": "hello world"}\n{"body": "again"}\n', encoding="utf-8")
    parser = argparse.ArgumentParser(prog="k2train")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "prepare", "--input", str(tmp_path / "docs.jsonl"), "--output",
                              str(tmp_path / "ds"), "--tokenizer", str(hf_tokenizer_json),
                              "--jsonl-key", "body"])
    assert args.func(args) == 0
    assert "2 documents, 5 uint16 tokens" in capsys.readouterr().out
    dataset = IndexedDataset(tmp_path / "ds")
    assert [list(dataset[0]), list(dataset[1])] == [[1, 2, 4], [3, 4]]


# Sampler -----------------------------------------------------------------------------------------

@pytest.fixture
def counting_dataset(tmp_path) -> IndexedDataset:
    """101 tokens whose values are their positions, split over uneven documents."""
    tokens = np.arange(101)
    return IndexedDataset(write_ours(tmp_path / "count", np.split(tokens, [7, 30, 31, 64]), np.int32))


def test_sample_is_a_window_of_the_flat_stream(counting_dataset):
    sampler = SequenceSampler(counting_dataset, seq_len=10, seed=3)
    assert sampler.samples_per_epoch == 10
    inputs, labels = sampler.next_batch(4)
    assert inputs.shape == labels.shape == (4, 10) and inputs.dtype == labels.dtype == torch.int64
    starts = inputs[:, 0]
    assert torch.all(starts % 10 == 0)
    assert torch.equal(inputs, starts[:, None] + torch.arange(10))
    assert torch.equal(labels, inputs + 1)


def draw(sampler: SequenceSampler, batches: int, batch_size: int = 3, **kw) -> list[torch.Tensor]:
    return [sampler.next_batch(batch_size, **kw)[0] for _ in range(batches)]


def test_sampler_is_deterministic_and_seeded(counting_dataset):
    first = draw(SequenceSampler(counting_dataset, 10, seed=5), 4)
    again = draw(SequenceSampler(counting_dataset, 10, seed=5), 4)
    other = draw(SequenceSampler(counting_dataset, 10, seed=6), 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_epochs_are_permutations_and_wrap(counting_dataset):
    sampler = SequenceSampler(counting_dataset, 10, seed=0)
    starts = torch.cat(draw(sampler, 7))[:, 0].tolist()  # 21 samples: two epochs and one more
    epoch0, epoch1 = starts[:10], starts[10:20]
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, 100, 10))
    assert epoch0 != epoch1
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["offset"] == 1


def test_resume_draws_the_same_next_batches(counting_dataset):
    uninterrupted = SequenceSampler(counting_dataset, 10, seed=9)
    draw(uninterrupted, 3, world=2)
    state = uninterrupted.state_dict()
    expected = draw(uninterrupted, 5, world=2, rank=1)

    resumed = SequenceSampler(counting_dataset, 10, seed=9)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(draw(resumed, 5, world=2, rank=1), expected))


def test_rank_slices_tile_the_global_batch(counting_dataset):
    whole = draw(SequenceSampler(counting_dataset, 10, seed=2), 3, batch_size=6)
    ranks = [draw(SequenceSampler(counting_dataset, 10, seed=2), 3, batch_size=2, rank=r, world=3)
             for r in range(3)]
    for step in range(3):
        assert torch.equal(torch.cat([ranks[r][step] for r in range(3)]), whole[step])


def test_sampler_errors(tmp_path, counting_dataset):
    short = IndexedDataset(write_ours(tmp_path / "short", [np.arange(8)], np.int32))
    with pytest.raises(DataError, match=f"{tmp_path / 'short'} has 8 tokens.*seq_len \\+ 1 = 9"):
        SequenceSampler(short, seq_len=8, seed=0)
    SequenceSampler(short, seq_len=7, seed=0).next_batch(2)  # one sample, drawn twice: fine
    state = SequenceSampler(counting_dataset, 10, seed=0).state_dict()
    with pytest.raises(DataError, match="10 samples of 10 tokens.*holds 0: it is not the data"):
        SequenceSampler(short, 7, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seed 0.*has 1"):
        SequenceSampler(counting_dataset, 10, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="rank 2"):
        SequenceSampler(counting_dataset, 10, seed=0).next_batch(1, rank=2, world=2)


# Default corpus ----------------------------------------------------------------------------------

def test_default_corpus_builds_once_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("K2TRAIN_CACHE", str(tmp_path / "cache"))
    results = []
    racers = [threading.Thread(target=lambda: results.append(default_corpus_prefix(max_bytes=100_000)))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert len(results) == 2 and results[0] == results[1]
    prefix = results[0]
    assert prefix.startswith(str(tmp_path / "cache"))
    published = sorted(p.name for p in Path(prefix).parent.iterdir())
    assert published == [Path(prefix).name + suffix for suffix in (".bin", ".idx")]  # no temporaries

    dataset = IndexedDataset(prefix)
    assert 50_000 < dataset.num_tokens <= 100_000 + dataset.num_documents
    dataset.check_vocab(257)
    assert all(dataset[i][-1] == 256 for i in range(len(dataset)))
    assert "import " in ByteTokenizer().decode(dataset[0].tolist())

    mtime = Path(prefix + ".bin").stat().st_mtime_ns
    monkeypatch.setattr("k2train.data.default_corpus.write_documents", None)  # a rebuild would fail
    assert default_corpus_prefix(max_bytes=100_000) == prefix
    assert Path(prefix + ".bin").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    monkeypatch.setenv("K2TRAIN_CACHE", str(tmp_path / "cache"))
    # A smaller cap selects fewer files: another name, so the two never share a cache entry.
    assert default_corpus_prefix(max_bytes=60_000) != prefix

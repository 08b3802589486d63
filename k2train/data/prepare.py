"""Text to indexed dataset: `prepare_dataset`, which `k2train data prepare` runs (launch/data_cli.py).

Inputs are plain text files (each file is one document) or JSONL files (suffix `.jsonl`, each
non-blank line one JSON object whose `jsonl_key` string is a document). Every document is
tokenized and followed by the tokenizer's end-of-document id, so the flat token stream the
sampler reads has a boundary marker between documents, as Megatron's `preprocess_data --append-eod`.

Real corpora are large, so tokenizing runs in `workers` processes (each loads the tokenizer once
and encodes batches of documents; results come back in input order, so the output does not depend
on the worker count), with a progress bar on stderr. The .bin and .idx are written aside and
renamed into place (`IndexedDatasetWriter`): a crash leaves no half-written prefix.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from k2train.data.errors import DataError
from k2train.data.indexed import IndexedDatasetWriter
from k2train.data.tokenizer import BYTE_SPEC, Tokenizer, load_tokenizer

# megatron.core.datasets.indexed_dataset.DType.optimal_dtype uses uint16 below this vocab size.
UINT16_VOCAB_LIMIT = 65500
# Documents a worker encodes per task: few enough round trips, small enough to keep all busy.
WORKER_BATCH = 64


@dataclass(frozen=True)
class PrepareSummary:
    """What one preparation wrote."""

    prefix: str
    documents: int
    tokens: int
    dtype: str
    # Documents with no text, left out (a lone end-of-document id carries nothing to learn).
    skipped_empty: int


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as Megatron chooses), else int32."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def _jsonl_documents(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"line {number} of {path} is not valid JSON: {exc}.") from exc
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"line {number} of {path} has no key {key!r} (--jsonl-key).")
            if not isinstance(record[key], str):
                kind = type(record[key]).__name__
                raise DataError(f"line {number} of {path} has a {kind} under {key!r}; expected a string.")
            yield record[key]


def iter_documents(inputs: Iterable[Path], jsonl_key: str = "text") -> Iterator[str]:
    """The documents of each input in order: a whole text file, or each line of a `.jsonl` file."""
    for path in map(Path, inputs):
        if not path.is_file():
            raise DataError(f"input file {path} does not exist.")
        try:
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, jsonl_key)
            else:
                yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"input file {path} is not UTF-8 text: {exc}.") from exc


def write_documents(documents: Iterable[str], output_prefix: str | os.PathLike, tokenizer: Tokenizer,
                    spec: str | None = None, workers: int = 1, progress: bool = False) -> PrepareSummary:
    """Tokenize `documents`, append the end-of-document id to each, and write an indexed dataset.

    With `workers` > 1, worker processes load the tokenizer of `spec` and encode in parallel."""
    dtype = token_dtype(tokenizer.vocab_size)
    count = skipped = 0
    bar = tqdm(disable=not progress, unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    with IndexedDatasetWriter(output_prefix, dtype) as writer, bar:
        for ids in _encoded(documents, tokenizer, spec, workers):
            if ids is None:
                skipped += 1
                continue
            writer.add_document(ids)
            count += 1
            bar.update(1)
            bar.set_postfix(tokens=writer.num_tokens, refresh=False)
    return PrepareSummary(str(output_prefix), count, writer.num_tokens, dtype.name, skipped)


def _encode_batch(texts: list[str], tokenizer: Tokenizer) -> list[np.ndarray | None]:
    """Each text's ids followed by the end-of-document id; None for an empty text."""
    return [np.asarray([*tokenizer.encode(text), tokenizer.eod_id], dtype=np.int64) if text else None
            for text in texts]


@functools.cache
def _worker_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of `spec`, loaded once per worker process."""
    return load_tokenizer(spec)


def _worker_batch(spec: str, texts: list[str]) -> list[np.ndarray | None]:
    return _encode_batch(texts, _worker_tokenizer(spec))


def _encoded(documents: Iterable[str], tokenizer: Tokenizer, spec: str | None, workers: int):
    batches = iter(lambda it=iter(documents): list(itertools.islice(it, WORKER_BATCH)), [])
    if workers <= 1 or spec is None:
        for batch in batches:
            yield from _encode_batch(batch, tokenizer)
        return
    # Windows of a few batches per worker: Pool.imap would read the whole corpus into its queue.
    windows = iter(lambda: list(itertools.islice(batches, 4 * workers)), [])
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for window in windows:
            for encoded in pool.imap(functools.partial(_worker_batch, spec), window):
                yield from encoded


def prepare_dataset(inputs: list[Path], output_prefix: str | os.PathLike, tokenizer_spec: str = BYTE_SPEC,
                    jsonl_key: str = "text", workers: int = 1, progress: bool = False) -> PrepareSummary:
    """Turn text and JSONL files into `output_prefix`.bin/.idx with the tokenizer of `tokenizer_spec`."""
    if not inputs:
        raise DataError("no input files were given to prepare.")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    tokenizer = load_tokenizer(tokenizer_spec)
    return write_documents(iter_documents(inputs, jsonl_key), output_prefix, tokenizer, tokenizer_spec,
                           workers, progress)

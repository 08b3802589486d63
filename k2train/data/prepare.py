"""Text to indexed dataset: `prepare_dataset` and the `k2train data prepare` command.

Inputs are plain text files (each file is one document) or JSONL files (suffix `.jsonl`, each
non-blank line one JSON object whose `jsonl_key` string is a document). Every document is
tokenized and followed by the tokenizer's end-of-document id, so the flat token stream the
sampler reads has a boundary marker between documents, as Megatron's `preprocess_data --append-eod`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2train.data.errors import DataError
from k2train.data.indexed import IndexedDatasetWriter
from k2train.data.tokenizer import BYTE_SPEC, Tokenizer, load_tokenizer

# megatron.core.datasets.indexed_dataset.DType.optimal_dtype uses uint16 below this vocab size.
UINT16_VOCAB_LIMIT = 65500


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


def write_documents(documents: Iterable[str], output_prefix: str | os.PathLike,
                    tokenizer: Tokenizer) -> PrepareSummary:
    """Tokenize `documents`, append the end-of-document id to each, and write an indexed dataset."""
    dtype = token_dtype(tokenizer.vocab_size)
    count = skipped = 0
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for text in documents:
            if not text:
                skipped += 1
                continue
            ids = tokenizer.encode(text)
            ids.append(tokenizer.eod_id)
            writer.add_document(np.asarray(ids, dtype=np.int64))
            count += 1
    return PrepareSummary(str(output_prefix), count, writer.num_tokens, dtype.name, skipped)


def prepare_dataset(inputs: list[Path], output_prefix: str | os.PathLike,
                    tokenizer_spec: str = BYTE_SPEC, jsonl_key: str = "text") -> PrepareSummary:
    """Turn text and JSONL files into `output_prefix`.bin/.idx with the tokenizer of `tokenizer_spec`."""
    if not inputs:
        raise DataError("no input files were given to prepare.")
    tokenizer = load_tokenizer(tokenizer_spec)
    return write_documents(iter_documents(inputs, jsonl_key), output_prefix, tokenizer)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of `k2train data prepare`; prints what was written and returns the exit status."""
    summary = prepare_dataset([Path(p) for p in args.input], args.output, args.tokenizer, args.jsonl_key)
    skipped = f", {summary.skipped_empty} empty documents skipped" if summary.skipped_empty else ""
    documents = f"{summary.documents} document{'' if summary.documents == 1 else 's'}"
    print(f"wrote {summary.prefix}.bin and {summary.prefix}.idx: {documents}, "
          f"{summary.tokens} {summary.dtype} tokens (tokenizer {args.tokenizer}){skipped}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data prepare ...` on the main CLI's subparsers; the handler is `args.func(args)`."""
    data = subparsers.add_parser("data", help="prepare training data")
    commands = data.add_subparsers(dest="data_command", required=True)
    prepare = commands.add_parser(
        "prepare", help="tokenize text or JSONL files into a Megatron indexed dataset (.bin/.idx)"
    )
    prepare.add_argument("--input", nargs="+", required=True, metavar="FILE",
                         help="text files (one document each) or .jsonl files (one document per line)")
    prepare.add_argument("--output", required=True, metavar="PREFIX",
                         help="writes PREFIX.bin and PREFIX.idx")
    prepare.add_argument("--tokenizer", default=BYTE_SPEC, metavar="byte|PATH",
                         help="'byte' (built in, 257 ids) or the path of a HF tokenizer.json")
    prepare.add_argument("--jsonl-key", default="text", help="the JSONL field holding the text")
    prepare.set_defaults(func=run_prepare)
    return data

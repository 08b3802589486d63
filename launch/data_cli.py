"""The `k2train data prepare` command: text or JSONL files to a Megatron indexed dataset
(k2train/data/prepare.py does the work; it is imported when the command runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from k2train.data.tokenizer import BYTE_SPEC


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
                         help="'byte' (built in, 257 ids), a HF tokenizer.json, or a tiktoken BPE file such as "
                              "Kimi K2's tiktoken.model (with its tokenizer_config.json beside it)")
    prepare.add_argument("--jsonl-key", default="text", help="the JSONL field holding the text")
    prepare.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                         help="tokenizer processes (default: the CPU count, at most 8)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    prepare.set_defaults(func=run_prepare)
    return data


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of `k2train data prepare`; prints what was written and returns the exit status."""
    from k2train.data.prepare import prepare_dataset

    summary = prepare_dataset([Path(p) for p in args.input], args.output, args.tokenizer, args.jsonl_key,
                              args.workers, progress=not args.no_progress)
    skipped = f", {summary.skipped_empty} empty documents skipped" if summary.skipped_empty else ""
    documents = f"{summary.documents} document{'' if summary.documents == 1 else 's'}"
    print(f"wrote {summary.prefix}.bin and {summary.prefix}.idx: {documents}, "
          f"{summary.tokens} {summary.dtype} tokens (tokenizer {args.tokenizer}){skipped}")
    return 0

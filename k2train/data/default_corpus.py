"""The embedded default corpus: the Python standard library's own `.py` sources.

Text that is present on every machine that can run k2train, so a run with no `data.prefix`
still trains on real, structured text with no download. The selection is fixed: all UTF-8
`.py` files under `sysconfig.get_paths()["stdlib"]` outside tests, IDLE, site-packages and the
machine-specific `_sysconfigdata*`, sorted by relative path and taken in that order up to
`max_bytes` (about 8 MB by default, a few seconds to prepare). It is prepared once per
machine into `$K2TRAIN_CACHE` (default `~/.cache/k2train`) under a name that hashes the
selected files' contents and the tokenizer, so another Python version, another cap or another
tokenizer gets its own dataset. Writing goes through `IndexedDatasetWriter` (aside, then
renamed), so processes racing to prepare it each publish a complete, identical copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from pathlib import Path

from k2train.data.errors import DataError
from k2train.data.prepare import write_documents
from k2train.data.tokenizer import BYTE_SPEC, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8_000_000
# Bump when the selection rule or the document layout changes, so old caches are not reused.
CORPUS_FORMAT = 1
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    """Where prepared data is cached: `$K2TRAIN_CACHE`, else `~/.cache/k2train`."""
    return Path(os.environ.get("K2TRAIN_CACHE") or Path.home() / ".cache" / "k2train")


def _candidate_sources(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's `.py` files outside the excluded folders, sorted."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        relative = Path(folder).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append((relative / name).as_posix())
    return sorted(found)


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[str], str]:
    """The selected sources' texts (one document per file) and a digest of the selection.

    Files are taken in sorted order until the next one would pass `max_bytes`; files that are
    not UTF-8 are skipped. The digest covers each file's relative path and bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256(f"stdlib-corpus-{CORPUS_FORMAT}".encode())
    texts, total = [], 0
    for relative in _candidate_sources(root):
        raw = (root / relative).read_bytes()
        if total + len(raw) > max_bytes:
            break
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        digest.update(f"{relative}\0{len(raw)}\0".encode())
        digest.update(raw)
        texts.append(text)
        total += len(raw)
    if not texts:
        raise DataError(
            f"no standard-library source under {root} fits the default corpus cap of {max_bytes} bytes."
        )
    return texts, digest.hexdigest()


def default_corpus_prefix(tokenizer_spec: str = BYTE_SPEC, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The prefix of the default corpus prepared with `tokenizer_spec`, preparing it on first use."""
    tokenizer = load_tokenizer(tokenizer_spec)
    texts, digest = stdlib_documents(max_bytes)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    prefix = cache_dir() / "data" / f"stdlib-{version}-{tokenizer.fingerprint}-{digest[:16]}"
    if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file():
        return str(prefix)
    logger.info("preparing the default corpus (%d stdlib sources) into %s", len(texts), prefix)
    summary = write_documents(texts, prefix, tokenizer)
    logger.info("default corpus: %d documents, %d tokens", summary.documents, summary.tokens)
    return str(prefix)

"""Megatron's indexed dataset (`PREFIX.bin` + `PREFIX.idx`, the "MMIDIDX" format): reader and writer.

Users already have pre-tokenised data in this format (megatron-core's `tools/preprocess_data.py`),
so the layout follows megatron-core 0.16.1 `megatron/core/datasets/indexed_dataset.py` exactly:

    PREFIX.idx, little-endian:
        b"MMIDIDX\\x00\\x00"   9-byte magic
        <Q                    version, always 1
        <B                    dtype code of the tokens (`DTYPE_CODES`)
        <Q                    S, the number of sequences
        <Q                    D, the number of document-index entries (documents + 1)
        int32[S]              sequence lengths in tokens
        int64[S]              sequence byte offsets into PREFIX.bin
        int64[D]              document indices: sequence index where each document starts, 0 first, S last
        int8[S]               sequence modes, only in multimodal datasets (ignored here)
    PREFIX.bin: the tokens of all sequences back to back, in the dtype of the header.

Sequences are contiguous in the .bin (the writer of every Megatron tool lays them out so, and the
reader checks it), which makes the dataset one flat token stream: `read_tokens` slices it directly.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

import numpy as np

from k2train.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8).
HEADER_BYTES = 34
# megatron.core.datasets.indexed_dataset.DType; 6 (float64) and 7 (float32) exist there but never
# hold token ids, so they are rejected with their own message.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
_FLOAT_CODES = {6: "float64", 7: "float32"}
# Tokens scanned at once by `check_vocab`: bounds the temporary arrays, not the mmap.
_SCAN_CHUNK = 1 << 24


def _paths(prefix: str) -> tuple[str, str]:
    return f"{prefix}.bin", f"{prefix}.idx"


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """Return (token dtype, sequence count S, document-index count D) from the 34-byte header."""
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise DataError(f"{idx_path} has {len(head)} bytes, fewer than the {HEADER_BYTES}-byte header.")
    if head[:9] != MAGIC:
        raise DataError(f"{idx_path} starts with {head[:9]!r}, not the indexed-dataset magic {MAGIC!r}.")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise DataError(f"{idx_path} has format version {version}; only version {VERSION} is supported.")
    code = head[17]
    if code in _FLOAT_CODES:
        raise DataError(f"{idx_path} holds {_FLOAT_CODES[code]} values (dtype code {code}), not token ids.")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path} has dtype code {code}; expected one of {sorted(DTYPE_CODES)}.")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    return DTYPE_CODES[code], sequences, documents


def _check_index(lengths: np.ndarray, pointers: np.ndarray, docs: np.ndarray, itemsize: int,
                 idx_path: str) -> None:
    """Raise unless lengths, byte pointers and document indices describe one contiguous .bin."""
    count = len(lengths)
    if count and int(lengths.min()) < 0:
        bad = int(np.argmax(lengths < 0))
        raise DataError(f"{idx_path} gives sequence {bad} the negative length {int(lengths[bad])}.")
    expected = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
    expected *= itemsize
    if not np.array_equal(pointers, expected):
        bad = int(np.argmax(pointers != expected))
        raise DataError(
            f"{idx_path} puts sequence {bad} at byte {int(pointers[bad])} of the .bin, but the lengths "
            f"before it end at byte {int(expected[bad])}."
        )
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != count or np.any(np.diff(docs) < 0):
        raise DataError(
            f"{idx_path} has document indices that do not rise from 0 to its sequence count {count}."
        )


class IndexedDataset:
    """Read-only, memory-mapped view of `PREFIX.bin` + `PREFIX.idx`.

    `ds[i]` is sequence i (1-D array of `ds.dtype`, a view into the mmap); `read_tokens(start, n)`
    is n tokens of the flat stream of all sequences. Opening validates the header, the index and
    the .bin size against each other, so a truncated or mismatched pair fails here, not mid-run.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(f"indexed dataset file {path} does not exist (prefix {self.prefix}).")
        self.dtype, sequences, documents = _read_header(self.idx_path)
        self._open_index(sequences, documents)
        self._open_bin()

    def _open_index(self, sequences: int, documents: int) -> None:
        size = os.path.getsize(self.idx_path)
        needed = HEADER_BYTES + sequences * (4 + 8) + documents * 8
        # Multimodal indices append one int8 mode per sequence; the tokens are still readable.
        if size not in (needed, needed + sequences):
            raise DataError(
                f"{self.idx_path} has {size} bytes, but its header ({sequences} sequences, "
                f"{documents} document entries) needs {needed}."
            )
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(raw, np.int32, sequences, offset)
        offset += 4 * sequences
        self.sequence_pointers = np.frombuffer(raw, np.int64, sequences, offset)
        offset += 8 * sequences
        self.document_indices = np.frombuffer(raw, np.int64, documents, offset)
        _check_index(self.sequence_lengths, self.sequence_pointers, self.document_indices,
                     self.dtype.itemsize, self.idx_path)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))

    def _open_bin(self) -> None:
        size = os.path.getsize(self.bin_path)
        needed = self.num_tokens * self.dtype.itemsize
        if size < needed:
            raise DataError(
                f"{self.bin_path} has {size} bytes, but {self.idx_path} describes {self.num_tokens} "
                f"{self.dtype.name} tokens ({needed} bytes): the .bin is truncated."
            )
        if size > needed:
            raise DataError(
                f"{self.bin_path} has {size} bytes, but {self.idx_path} describes only {needed}: "
                f"the .idx does not belong to this .bin."
            )
        # np.memmap cannot map an empty file.
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if size
                        else np.empty(0, dtype=self.dtype))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence `index` as a 1-D read-only array of `self.dtype`."""
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"sequence {index} is out of range for {self.prefix} ({count} sequences).")
        index %= count
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[index])]

    def read_tokens(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the flat stream of all sequences (a view, no copy)."""
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(
                f"token range [{start}, {start + count}) is outside {self.prefix} "
                f"({self.num_tokens} tokens)."
            )
        return self._tokens[start:start + count]

    def check_vocab(self, vocab_size: int) -> None:
        """Raise `DataError` unless every token id is in [0, vocab_size); scans the mmap in chunks."""
        info = np.iinfo(self.dtype)
        if info.min >= 0 and info.max < vocab_size:
            return  # the dtype itself cannot hold an id out of range
        for begin in range(0, self.num_tokens, _SCAN_CHUNK):
            chunk = self._tokens[begin:begin + _SCAN_CHUNK]
            if int(chunk.max()) < vocab_size and int(chunk.min()) >= 0:
                continue
            bad = int(np.argmax((chunk >= vocab_size) | (chunk < 0)))
            raise DataError(
                f"{self.bin_path} holds token id {int(chunk[bad])} at position {begin + bad}, "
                f"outside the model's vocab of {vocab_size} ids (model.vocab_size)."
            )

    def __reduce__(self):
        # Reopen by prefix when pickled (e.g. into DataLoader workers) instead of copying the mmap.
        return (type(self), (self.prefix,))

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} "
                f"documents, {self.num_tokens} {self.dtype.name} tokens)")


def dtype_code(dtype: np.dtype | type) -> int:
    """The header code of a token dtype; `DataError` for dtypes the format cannot hold as tokens."""
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    names = ", ".join(d.name for d in DTYPE_CODES.values())
    raise DataError(f"token dtype {dtype.name} cannot be written; expected one of {names}.")


class IndexedDatasetWriter:
    """Writes `PREFIX.bin` + `PREFIX.idx`, one sequence per document (as `preprocess_data` does).

    Both files are written aside under unique temporary names and renamed into place by
    `finalize`, .bin first and .idx last, so a reader never sees a half-written pair and two
    processes writing the same prefix each publish a complete one. Used as a context manager it
    finalizes on success and removes its temporary files on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._bin_path, self._idx_path = _paths(self.prefix)
        self._tmp_bin, self._tmp_idx = self._bin_path + tag, self._idx_path + tag
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        """Append one document; `tokens` is a 1-D sequence of ints that fit `self.dtype`."""
        array = np.asarray(tokens)
        where = f"document {len(self._lengths)} of {self.prefix}"
        if array.ndim != 1:
            raise DataError(f"{where} has shape {array.shape}; expected a 1-D sequence of token ids.")
        if array.size and array.dtype.kind not in "iu":
            raise DataError(f"{where} has {array.dtype.name} values; expected integer token ids.")
        if array.size:
            info = np.iinfo(self.dtype)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise DataError(
                    f"{where} has token ids in [{low}, {high}], outside the {self.dtype.name} range "
                    f"[{info.min}, {info.max}]."
                )
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))
        self.num_tokens += int(array.size)

    def finalize(self) -> None:
        """Write the index and publish both files under the prefix."""
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QB", VERSION, self._code))
            f.write(struct.pack("<QQ", len(lengths), len(documents)))
            for array in (lengths, pointers, documents):
                f.write(array.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._tmp_bin, self._bin_path)
        os.replace(self._tmp_idx, self._idx_path)

    def abort(self) -> None:
        """Drop what was written; the prefix is left as it was."""
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

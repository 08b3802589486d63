"""Tokenizers: a built-in byte-level one, a local HF `tokenizer.json`, or a tiktoken BPE file
(Kimi K2's `tiktoken.model`, k2train/data/tiktoken_bpe.py).

All give `encode(text) -> list[int]` (no end-of-document token added: callers append `eod_id`
between documents), `decode(ids) -> str`, `eod_id`, `vocab_size`, and `fingerprint`, a short
string that changes whenever the mapping from text to ids can change (it names cached data).
Nothing is downloaded: an HF tokenizer is only ever a file on disk.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from k2train.data.eod import EOD_TOKEN_NAMES, configured_eos
from k2train.data.errors import DataError

BYTE_SPEC = "byte"


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text, 256 is end-of-document: vocab of 257."""

    vocab_size = 257
    eod_id = 256
    fingerprint = BYTE_SPEC
    # How `decode` shows an end-of-document id (encoding this text gives its bytes, not 256).
    eod_text = "<|endoftext|>"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; ids cut mid-character decode as U+FFFD, like model samples can."""
        pieces, run = [], bytearray()
        for token in ids:
            token = int(token)
            if token == self.eod_id:
                pieces.append(run.decode("utf-8", errors="replace"))
                pieces.append(self.eod_text)
                run = bytearray()
            elif 0 <= token < 256:
                run.append(token)
            else:
                raise DataError(f"token id {token} is outside the byte tokenizer's ids 0..256.")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)


class HFTokenizer:
    """A HF `tokenizers` tokenizer loaded from a local `tokenizer.json`.

    The end-of-document token is `eod_token` if given, else the `eos_token` of a
    `tokenizer_config.json` in the same folder, else the first of `EOD_TOKEN_NAMES` in the vocab.
    """

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer  # only needed for this kind

        self.path = Path(path)
        try:
            self._tokenizer = _HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{self.path} could not be loaded as a HF tokenizer.json: {exc}.") from exc
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._find_eod(eod_token)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self.fingerprint = f"hf-{digest}-eod{self.eod_id}"

    def _find_eod(self, eod_token: str | None) -> int:
        configured = eod_token or configured_eos(self.path.parent / "tokenizer_config.json")
        candidates = (configured,) if configured else EOD_TOKEN_NAMES
        for name in candidates:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise DataError(
            f"{self.path} has no end-of-document token: none of {', '.join(candidates)} is in its vocab."
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" for the byte tokenizer, else the path of a tokenizer.json or a tiktoken BPE file, or
    of a folder holding one (tokenizer.json first, then tiktoken.model)."""
    from k2train.data.tiktoken_bpe import TIKTOKEN_FILE, TiktokenTokenizer, is_tiktoken_file

    if spec == BYTE_SPEC:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = next((path / n for n in ("tokenizer.json", TIKTOKEN_FILE) if (path / n).is_file()), path / "tokenizer.json")
    if not path.is_file():
        raise DataError(
            f"tokenizer {spec!r} is neither {BYTE_SPEC!r} nor an existing tokenizer.json or {TIKTOKEN_FILE} file "
            f"(data.tokenizer / --tokenizer)."
        )
    if path.suffix != ".json" and is_tiktoken_file(path):
        return TiktokenTokenizer(path)
    return HFTokenizer(path)

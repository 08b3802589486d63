"""Tiktoken BPE tokenizers: Kimi K2's own (`tiktoken.model`) and any other tiktoken BPE file.

The file holds one "<base64 token bytes> <rank>" line per token. The special tokens and the
end-of-document token come from `tokenizer_config.json` beside it, as for a tokenizer.json:
`added_tokens_decoder` ({"163584": {"content": "[BOS]", ...}, ...}) names special ids,
`num_reserved_special_tokens` (default 256, as Kimi's `tokenization_kimi.py`) reserves that many
ids above the BPE ranks (unnamed ones become "<|reserved_token_{id}|>"), and `eos_token` is the
end of a document (else the first of `EOD_TOKEN_NAMES` present). The split pattern is the
config's `pat_str` when it has one; Kimi's files do not carry it (it is code in
`tokenization_kimi.py`), so the default is K2's pattern, copied below.

Encoding treats special-token text in a document as plain text (a training document that
contains "[EOS]" does not end there), and cuts text as Kimi's tokenizer does before tiktoken sees
it: pieces of at most 400,000 characters, and runs of more than 25,000 consecutive whitespace or
non-whitespace characters split, which keeps tiktoken's regex within its limits.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from k2train.data.errors import DataError
from k2train.data.eod import EOD_TOKEN_NAMES, configured_eos

TIKTOKEN_FILE = "tiktoken.model"
# tokenization_kimi.py (Kimi-K2): Han runs apart, then cased words with English contractions,
# numbers of up to three digits, punctuation runs, newlines and other whitespace.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
DEFAULT_RESERVED_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1}}}|\S{{{MAX_RUN_CHARS + 1}}}")


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` looks like a tiktoken BPE file: its first line is "<base64> <int>"."""
    with path.open("rb") as f:
        first = f.readline().split()
    return len(first) == 2 and first[1].isdigit()


def _read_config(config_path: Path) -> dict:
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{config_path} is not a readable JSON object: {exc}.") from exc
    if not isinstance(config, dict):
        raise DataError(f"{config_path} holds a {type(config).__name__}; expected a JSON object.")
    return config


def special_tokens(config: dict, num_base: int, config_path: Path) -> dict[str, int]:
    """Name -> id of the special tokens: the config's named ones and the reserved rest."""
    named = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (str(key).isdigit() and isinstance(content, str)):
            raise DataError(f"{config_path}: added_tokens_decoder entry {key!r} is not an id with a 'content'.")
        if int(key) < num_base:
            raise DataError(f"{config_path}: special token {content!r} has id {key}, which the BPE ranks "
                            f"0..{num_base - 1} already use.")
        named[int(key)] = content
    reserved = int(config.get("num_reserved_special_tokens", DEFAULT_RESERVED_SPECIAL_TOKENS))
    ids = set(range(num_base, num_base + reserved)) | set(named)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in sorted(ids)}


class TiktokenTokenizer:
    """A tiktoken BPE file (`tiktoken.model`) with its tokenizer_config.json (module docstring)."""

    def __init__(self, path: str | Path, eod_token: str | None = None):
        import tiktoken  # only needed for this kind
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        config_path = self.path.parent / "tokenizer_config.json"
        config = _read_config(config_path)
        try:
            ranks = load_tiktoken_bpe(str(self.path))
        except Exception as exc:  # a malformed line raises ValueError or binascii.Error
            raise DataError(f"{self.path} could not be read as a tiktoken BPE file: {exc}.") from exc
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise DataError(f"{self.path} does not number its {len(ranks)} tokens 0..{len(ranks) - 1}.")
        self.specials = special_tokens(config, len(ranks), config_path)
        self.pattern = config.get("pat_str") or KIMI_PATTERN
        try:
            self._encoding = tiktoken.Encoding(
                name=self.path.stem, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        except Exception as exc:  # tiktoken raises ValueError for a pattern its regex engine rejects
            raise DataError(f"{self.path} with the split pattern of {config_path} cannot be used: {exc}.") from exc
        self.vocab_size = max([len(ranks) - 1, *self.specials.values()]) + 1
        self.eod_id = self._find_eod(eod_token or configured_eos(config_path))
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(json.dumps([self.pattern, sorted(self.specials.items())]).encode())
        self.fingerprint = f"tiktoken-{digest.hexdigest()[:16]}-eod{self.eod_id}"

    def _find_eod(self, configured: str | None) -> int:
        candidates = (configured,) if configured else EOD_TOKEN_NAMES
        for name in candidates:
            if name in self.specials:
                return self.specials[name]
        raise DataError(f"{self.path} has no end-of-document token: none of {', '.join(candidates)} is among "
                        f"its special tokens (tokenizer_config.json added_tokens_decoder).")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start:start + MAX_ENCODE_CHARS]):
                ids += self._encoding.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode([int(i) for i in ids], errors="replace")


def _split_long_runs(text: str):
    """`text` cut wherever a run of whitespace or of non-whitespace passes MAX_RUN_CHARS (Kimi's rule)."""
    if not _LONG_RUN.search(text):
        yield text  # the common case: no cut, no per-character loop
        return
    run, is_space, start = 0, text[0].isspace(), 0
    for index, char in enumerate(text):
        if char.isspace() != is_space:
            run, is_space = 1, char.isspace()
            continue
        run += 1
        if run > MAX_RUN_CHARS:
            yield text[start:index]
            start, run = index, 1
    yield text[start:]

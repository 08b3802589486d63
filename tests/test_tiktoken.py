"""Tiktoken BPE tokenizers (Kimi K2's tiktoken.model format) and parallel `data prepare`.

The tests train a small BPE themselves and write it in the tiktoken format with a Kimi-style
tokenizer_config.json beside it; nothing is downloaded.
"""

from __future__ import annotations

import base64
import collections
import json
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from k2train.data import IndexedDataset, load_tokenizer, prepare_dataset
from k2train.data.errors import DataError
from k2train.data.tiktoken_bpe import KIMI_PATTERN, MAX_RUN_CHARS, TiktokenTokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog doesn't mind; they're friends.\n"
    "def tokenize(text):\n    return [t for t in text.split() if t]\n"
    "数据并行和流水线并行。 The numbers 12345 and 678 are there, too!\n"
) * 3
TEXTS = [
    "The quick brown fox doesn't jump.",
    "数据并行 and English mixed: 3.14159, 2026; \tTabs\n\nand newlines  ",
    "Emoji 🙂 and accents: café, naïve. Special text [EOS] stays text.",
    "",
]


def train_bpe(text: str, pattern: str, merges: int) -> dict[bytes, int]:
    """A byte-level BPE: the 256 bytes, then the most frequent adjacent pair inside each piece, again and again."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(pattern, text, flags=regex.V1))
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def write_tokenizer(folder: Path, config: dict | None = None, merges: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(CORPUS, KIMI_PATTERN, merges)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    default = {
        "added_tokens_decoder": {str(n): {"content": "[BOS]", "special": True},
                                 str(n + 1): {"content": "[EOS]", "special": True},
                                 str(n + 2): {"content": "<|im_end|>", "special": True}},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "num_reserved_special_tokens": 8,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config if config is not None else default))
    return folder / "tiktoken.model"


@pytest.fixture(scope="module")
def kimi_like(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("kimi"))


def reference(path: Path, pattern: str = KIMI_PATTERN, specials: dict | None = None) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="reference", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens=specials or {})


def test_kimi_style_file_round_trips_and_matches_tiktoken(kimi_like):
    tokenizer = load_tokenizer(str(kimi_like.parent))  # the folder, as for a tokenizer.json
    assert isinstance(tokenizer, TiktokenTokenizer)
    n = len(load_tiktoken_bpe(str(kimi_like)))
    assert tokenizer.eod_id == n + 1 and tokenizer.vocab_size == n + 8
    assert tokenizer.specials["<|reserved_token_%d|>" % (n + 5)] == n + 5
    own = reference(kimi_like)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == own.encode(text, disallowed_special=())
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were applied
    assert tokenizer.decode([tokenizer.eod_id]) == "[EOS]"


def test_split_pattern_and_end_of_document_come_from_the_config(tmp_path):
    gpt2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    path = write_tokenizer(tmp_path / "other", {"pat_str": gpt2, "added_tokens_decoder": {}})
    n = len(load_tiktoken_bpe(str(path)))
    path.parent.joinpath("tokenizer_config.json").write_text(json.dumps({
        "pat_str": gpt2, "num_reserved_special_tokens": 2,
        "added_tokens_decoder": {str(n + 1): {"content": "<|endoftext|>"}}}))
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.pattern == gpt2 and tokenizer.eod_id == n + 1  # found by its conventional name
    text = "numbers 12345678 and words"
    assert tokenizer.encode(text) == reference(path, gpt2).encode(text)
    assert tokenizer.encode(text) != reference(path).encode(text)  # Kimi's pattern cuts digits by 3


def test_long_runs_are_cut_as_kimi_does(kimi_like):
    tokenizer = TiktokenTokenizer(kimi_like)
    text = "ab " + "x" * (MAX_RUN_CHARS + 10) + " end"
    own = reference(kimi_like)
    cut = 3 + MAX_RUN_CHARS - 1  # the run starts at index 2 (after "ab" comes " ", then the x's)
    expected = own.encode(text[:cut]) + own.encode(text[cut:])
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unusable_tiktoken_files_are_refused(tmp_path):
    path = write_tokenizer(tmp_path / "noeos", {"added_tokens_decoder": {}, "num_reserved_special_tokens": 0})
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(str(path))
    path.parent.joinpath("tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"3": {"content": "[EOS]"}}}))
    with pytest.raises(DataError, match="special token '\\[EOS\\]' has id 3, which the BPE ranks"):
        load_tokenizer(str(path))


def test_parallel_prepare_writes_what_one_process_writes(kimi_like, tmp_path):
    inputs = []
    for i, text in enumerate(TEXTS * 40):
        inputs.append(tmp_path / f"doc{i:03d}.txt")
        inputs[-1].write_text(text + f" number {i}")
    one = prepare_dataset(inputs, tmp_path / "one", str(kimi_like), workers=1)
    many = prepare_dataset(inputs, tmp_path / "many", str(kimi_like), workers=2, progress=True)
    assert one.documents == many.documents == len(inputs) and one.tokens == many.tokens
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"many{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))  # written aside, then renamed
    tokenizer = load_tokenizer(str(kimi_like))
    dataset = IndexedDataset(tmp_path / "many")
    for index in (0, 7, 150):
        ids = np.asarray(dataset[index]).tolist()
        assert ids[-1] == tokenizer.eod_id
        assert tokenizer.decode(ids[:-1]) == inputs[index].read_text()

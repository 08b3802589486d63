"""Weighted mixtures of indexed datasets and their held-out validation parts.

`data.mixture` lists datasets with weights (K2's pre-training data is such a mixture of web,
code, math and knowledge corpora). Global sample i of the run comes from dataset
`choice(i)`, drawn with probability weight / sum(weights) from numpy's
`default_rng([seed, MIX_STREAM, i // CHOICE_BLOCK])`: a pure function of the seed and the sample
index, so the sequence of choices never depends on the batch size, the layout or a restart. Each
dataset keeps its own `SequenceSampler` (its own seeded permutation, `stream` = its index), which
hands out the dataset's next sequence whenever it is chosen. The position is therefore the count
of samples drawn plus every dataset's (epoch, offset), and `state_dict` holds exactly that, so a
resumed run draws the very samples an uninterrupted one would.

Held-out data: a dataset's `valid_prefix`, or the last `data.valid_fraction` of its documents
(cut at a document boundary, so no document is split between training and validation; shuffle the
documents when preparing if their order is not random). The validation sampler is a mixture of the
held-out parts with the same weights (its own choice stream), restarted from its first sample for
every evaluation, so each validation loss covers the same sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from k2train.config.checks import mixture_name
from k2train.config.schema import DataConfig, MixtureEntry
from k2train.data.errors import DataError
from k2train.data.indexed import IndexedDataset
from k2train.data.sampler import SequenceSampler, batch_tensors, check_batch_args

# Choices are drawn in blocks of this many samples (one generator per block).
CHOICE_BLOCK = 4096
MIX_STREAM = 0x6D6978  # "mix": keeps the choice stream apart from the datasets' permutations
VALID_STREAM = 0x76616C  # "val": the held-out samplers' streams


@dataclass(frozen=True)
class Part:
    """The token span [start, end) of one dataset that a sampler draws from."""

    name: str
    dataset: IndexedDataset
    start: int
    end: int


def held_out_start(dataset: IndexedDataset, fraction: float) -> int:
    """The first token of the last `fraction` of the dataset's documents (at least one, not all)."""
    documents = dataset.num_documents
    if documents < 2:
        raise DataError(
            f"{dataset.prefix} has {documents} document(s); holding out data.valid_fraction {fraction} of its "
            f"documents needs at least 2 (or give it a valid_prefix).")
    held = min(documents - 1, max(1, round(documents * fraction)))
    sequence = int(dataset.document_indices[documents - held])
    return int(dataset.sequence_pointers[sequence]) // dataset.dtype.itemsize


def open_checked(prefix: str, vocab_size: int, where: str) -> IndexedDataset:
    """Open `prefix` and check every token id fits the model; errors name `where` (the config key)."""
    try:
        dataset = IndexedDataset(prefix)
        dataset.check_vocab(vocab_size)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    return dataset


def split_parts(entries: list[MixtureEntry], data: DataConfig, vocab_size: int,
                keys: list[str]) -> tuple[list[Part], list[Part] | None]:
    """Training parts and held-out parts (None when nothing is held out) of the datasets."""
    train, valid = [], []
    for entry, key in zip(entries, keys, strict=True):
        name = mixture_name(entry)
        where = f"{key} (dataset {name!r})"
        dataset = open_checked(entry.prefix, vocab_size, where)
        end = dataset.num_tokens
        if entry.valid_prefix:
            held = open_checked(entry.valid_prefix, vocab_size, f"{where} valid_prefix")
            valid.append(Part(name, held, 0, held.num_tokens))
        elif data.valid_fraction:
            try:
                end = held_out_start(dataset, data.valid_fraction)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            valid.append(Part(name, dataset, end, dataset.num_tokens))
        train.append(Part(name, dataset, 0, end))
    return train, (valid or None)


def part_sampler(part: Part, seq_len: int, seed: int, stream: tuple[int, ...], where: str) -> SequenceSampler:
    try:
        return SequenceSampler(part.dataset, seq_len, seed, start=part.start, end=part.end, stream=stream)
    except DataError as err:
        raise DataError(f"{where} (dataset {part.name!r}): {err}") from None


class MixtureSampler:
    """Draws (inputs, labels) batches from weighted datasets; the same interface as SequenceSampler."""

    def __init__(self, samplers: list[SequenceSampler], names: list[str], weights: list[float], seed: int,
                 choice_stream: int = MIX_STREAM):
        self.samplers, self.names, self.weights = samplers, list(names), [float(w) for w in weights]
        self.seed, self.choice_stream = seed, choice_stream
        self.seq_len = samplers[0].seq_len
        self._cumulative = np.cumsum(self.weights) / math.fsum(self.weights)
        self.drawn = 0
        self.counts = [0] * len(samplers)
        self._block, self._choices = -1, np.empty(0, dtype=np.int64)

    def choices(self, start: int, count: int) -> np.ndarray:
        """The dataset index of global samples start, ..., start + count - 1."""
        pieces, index, end = [], start, start + count
        while index < end:
            block, within = divmod(index, CHOICE_BLOCK)
            take = min(end - index, CHOICE_BLOCK - within)
            pieces.append(self._block_choices(block)[within:within + take])
            index += take
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def _block_choices(self, block: int) -> np.ndarray:
        if block != self._block:
            rng = np.random.default_rng([self.seed, self.choice_stream, block])
            picked = np.searchsorted(self._cumulative, rng.random(CHOICE_BLOCK), side="right")
            self._choices, self._block = np.minimum(picked, len(self.samplers) - 1), block
        return self._choices

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s slice of the next global batch of `batch_size * world` samples.

        Every rank draws the whole global batch's sample ids (so all keep one position) and reads
        only the tokens of its own slice.
        """
        check_batch_args(batch_size, rank, world)
        total = batch_size * world
        chosen = self.choices(self.drawn, total)
        samples = np.empty(total, dtype=np.int64)
        for index, sampler in enumerate(self.samplers):
            mine = chosen == index
            samples[mine] = sampler.draw(int(mine.sum()))
            self.counts[index] += int(mine.sum())
        self.drawn += total
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        reads = [self.samplers[d].read_sample(s) for d, s in zip(chosen[rows], samples[rows])]
        return batch_tensors(reads, self.seq_len)

    def shares(self) -> dict[str, float]:
        """The realised fraction of the sequences drawn so far that came from each dataset."""
        return {name: count / max(1, self.drawn) for name, count in zip(self.names, self.counts)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mixture", "seed": self.seed, "names": self.names, "weights": self.weights,
            "drawn": self.drawn, "counts": list(self.counts),
            "datasets": [sampler.state_dict() for sampler in self.samplers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position of the same mixture (names, weights and seed)."""
        if state.get("kind") != "mixture":
            raise DataError("the saved sampler state is of a single dataset, but this run reads data.mixture; "
                            "a run cannot switch between them on resume.")
        for key in ("seed", "names", "weights"):
            if state[key] != getattr(self, key):
                raise DataError(f"the saved mixture has {key} {state[key]}, but this run's data.mixture has "
                                f"{getattr(self, key)}: it cannot resume the same draws.")
        for name, sampler, saved in zip(self.names, self.samplers, state["datasets"], strict=True):
            try:
                sampler.load_state_dict(saved)
            except DataError as err:
                raise DataError(f"data.mixture dataset {name!r}: {err}") from None
        self.drawn, self.counts = int(state["drawn"]), [int(c) for c in state["counts"]]


def _mixture(parts: list[Part], weights: list[float], data: DataConfig, streams: tuple[int, ...],
             choice_stream: int, key: str) -> MixtureSampler:
    samplers = [part_sampler(p, data.seq_len, data.seed, (*streams, i), f"{key}[{i}]") for i, p in enumerate(parts)]
    return MixtureSampler(samplers, [p.name for p in parts], weights, data.seed, choice_stream)


def build_samplers(data: DataConfig, vocab_size: int, default_prefix: str | None = None):
    """(training sampler, validation sampler or None) of `data`.

    One dataset (`data.prefix`, or `default_prefix` for the embedded corpus) is a plain
    SequenceSampler, drawing in exactly the order it always has; `data.mixture` a MixtureSampler.
    """
    if data.mixture:
        entries, keys = list(data.mixture), [f"data.mixture[{i}]" for i in range(len(data.mixture))]
        train, valid = split_parts(entries, data, vocab_size, keys)
        weights = [e.weight for e in entries]
        return (_mixture(train, weights, data, (), MIX_STREAM, "data.mixture"),
                None if valid is None else _mixture(valid, weights, data, (VALID_STREAM,), VALID_STREAM,
                                                    "data.mixture"))
    prefix = data.prefix or default_prefix
    if not prefix:
        raise DataError("no data: data.prefix and data.mixture are empty and no default corpus was given.")
    entry = MixtureEntry(prefix=prefix, name="data", valid_prefix=data.valid_prefix)
    (train,), valid = split_parts([entry], data, vocab_size, ["data.prefix"])
    sampler = part_sampler(train, data.seq_len, data.seed, (), "data.prefix")
    if valid is None:
        return sampler, None
    return sampler, part_sampler(valid[0], data.seq_len, data.seed, (VALID_STREAM,), "data.valid_prefix")

"""Deterministic, resumable sampling of fixed-length training sequences from an indexed dataset.

The dataset's tokens are one flat stream (documents already end in the end-of-document id); a
sampler reads the span [start, end) of it (all of it by default; a training or held-out part of
it when a validation split is cut, k2train/data/mixture.py). Sample i is tokens
[start + i*S, start + i*S + S + 1): S inputs and, shifted by one, their S next-token labels, so
consecutive samples share one boundary token and every token but the last is a label once per
epoch. Each epoch visits all `samples_per_epoch` samples in a permutation drawn from numpy's
`default_rng([seed, epoch, *stream])` (seed and epoch as separate entropy words, so (seed, epoch)
pairs never collide the way `seed + epoch` would; `stream` tells the datasets of a mixture apart).

Data parallelism: a step's global batch is the next `batch_size * world` samples of that order,
and rank r takes the contiguous slice [r * batch_size, (r + 1) * batch_size). Every rank calls
`next_batch` with the same `batch_size` and `world`, so all ranks advance through the same
position and hold the same `state_dict()`: one saved state resumes any rank, and the union of
the ranks' batches is exactly the batch a single rank would draw with `batch_size * world`.

A changed sequence length (K2's long-context stage: 4k pre-training, then 32k with YaRN) re-cuts
the span: `load_state_dict` keeps the epoch and the fraction of it already drawn, and carries on
in the permutation of the new cut. The tokens seen so far are not tracked one by one, so within
that one epoch some sequences of the new cut overlap tokens already seen and as many are never
visited; from the next epoch on every token is visited once per epoch again.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from k2train.data.errors import DataError
from k2train.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)


class SequenceSampler:
    """Draws (inputs, labels) batches of `seq_len` tokens in a seeded order, epoch after epoch.

    Position is (epoch, offset): `offset` samples of `epoch`'s permutation have been drawn.
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int, *, start: int = 0,
                 end: int | None = None, stream: tuple[int, ...] = ()):
        end = dataset.num_tokens if end is None else end
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be at least 1 (data.seq_len).")
        if not 0 <= start <= end <= dataset.num_tokens:
            raise DataError(f"token span [{start}, {end}) is outside {dataset.prefix} ({dataset.num_tokens} tokens).")
        if end - start < seq_len + 1:
            raise DataError(
                f"dataset {dataset.prefix} has {end - start} tokens{_span_note(start, end, dataset)}, fewer "
                f"than the seq_len + 1 = {seq_len + 1} one sequence needs (data.seq_len)."
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.seed = seed
        self.start, self.end, self.stream = start, end, tuple(stream)
        self.samples_per_epoch = (end - start - 1) // seq_len
        self.epoch = 0
        self.offset = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`; only the current epoch's is kept (8 bytes per sample)."""
        if epoch != self._permutation_epoch:
            rng = np.random.default_rng([self.seed, epoch, *self.stream])
            self._permutation = rng.permutation(self.samples_per_epoch)
            self._permutation_epoch = epoch
        return self._permutation

    def draw(self, count: int) -> np.ndarray:
        """The next `count` sample ids in order, crossing into following epochs as needed."""
        taken = []
        while count > 0:
            order = self._order(self.epoch)
            take = min(count, self.samples_per_epoch - self.offset)
            taken.append(order[self.offset:self.offset + take])
            self.offset += take
            count -= take
            if self.offset == self.samples_per_epoch:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)

    def read_sample(self, sample: int) -> np.ndarray:
        """The seq_len + 1 tokens of sample `sample` (inputs and, shifted by one, labels)."""
        return self.dataset.read_tokens(self.start + int(sample) * self.seq_len, self.seq_len + 1)

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s slice of the next global batch of `batch_size * world` samples.

        Returns (inputs_BS, labels_BS), int64 tensors of shape (batch_size, seq_len), where
        labels_BS[b, s] is the token after inputs_BS[b, s].
        """
        check_batch_args(batch_size, rank, world)
        samples = self.draw(batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
        return batch_tensors([self.read_sample(s) for s in samples], self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """The position, plus what it is only meaningful with (checked by `load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data and seed must be those it was saved with.

        A saved seq_len other than this sampler's re-cuts the span (module docstring)."""
        if state.get("kind") == "mixture":
            raise DataError("the saved sampler state is of a data.mixture, but this run reads one dataset; "
                            "a run cannot switch between them on resume.")
        if state.get("seed") != self.seed:
            raise DataError(
                f"the saved sampler state has seed {state.get('seed')}, but this run's sampler over "
                f"{self.dataset.prefix} has {self.seed}: it cannot resume the same order (data.seed)."
            )
        saved_len, saved_samples = int(state["seq_len"]), int(state["samples_per_epoch"])
        if (self.end - self.start - 1) // saved_len != saved_samples:
            raise DataError(
                f"the saved sampler state has {saved_samples} samples of {saved_len} tokens per epoch, but "
                f"{self.dataset.prefix}{_span_note(self.start, self.end, self.dataset)} holds "
                f"{(self.end - self.start - 1) // saved_len}: it is not the data the run was saved with."
            )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < saved_samples:
            raise DataError(
                f"the saved sampler position (epoch {epoch}, offset {offset}) is outside "
                f"0 <= offset < {saved_samples} samples per epoch."
            )
        if saved_len != self.seq_len:
            # The same fraction of the epoch, in the new cut's order (module docstring).
            recut = offset * self.samples_per_epoch // saved_samples
            logger.info("data.seq_len %d -> %d: %s re-cut at epoch %d, sample %d of %d (was %d of %d)",
                        saved_len, self.seq_len, self.dataset.prefix, epoch, recut, self.samples_per_epoch,
                        offset, saved_samples)
            offset = recut
        self.epoch, self.offset = epoch, offset


def _span_note(start: int, end: int, dataset: IndexedDataset) -> str:
    return "" if (start, end) == (0, dataset.num_tokens) else f" in its token span [{start}, {end})"


def check_batch_args(batch_size: int, rank: int, world: int) -> None:
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise DataError(
            f"next_batch needs batch_size >= 1 and 0 <= rank < world; got batch_size "
            f"{batch_size}, rank {rank}, world {world}."
        )


def batch_tensors(rows: list[np.ndarray], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, labels_BS) int64 tensors from rows of seq_len + 1 tokens."""
    tokens_BT = np.empty((len(rows), seq_len + 1), dtype=np.int64)
    for index, row in enumerate(rows):
        tokens_BT[index] = row
    tokens = torch.from_numpy(tokens_BT)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

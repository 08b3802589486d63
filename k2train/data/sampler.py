"""Deterministic, resumable sampling of fixed-length training sequences from an indexed dataset.

The dataset's tokens are one flat stream (documents already end in the end-of-document id).
Sample i is tokens [i*S, i*S + S + 1): S inputs and, shifted by one, their S next-token labels,
so consecutive samples share one boundary token and every token but the last is a label once
per epoch. Each epoch visits all `samples_per_epoch` samples in a permutation drawn from
numpy's `default_rng([seed, epoch])` (seed and epoch as separate entropy words, so (seed, epoch)
pairs never collide the way `seed + epoch` would).

Data parallelism: a step's global batch is the next `batch_size * world` samples of that order,
and rank r takes the contiguous slice [r * batch_size, (r + 1) * batch_size). Every rank calls
`next_batch` with the same `batch_size` and `world`, so all ranks advance through the same
position and hold the same `state_dict()`: one saved state resumes any rank, and the union of
the ranks' batches is exactly the batch a single rank would draw with `batch_size * world`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from k2train.data.errors import DataError
from k2train.data.indexed import IndexedDataset


class SequenceSampler:
    """Draws (inputs, labels) batches of `seq_len` tokens in a seeded order, epoch after epoch.

    Position is (epoch, offset): `offset` samples of `epoch`'s permutation have been drawn.
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int):
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be at least 1 (data.seq_len).")
        if dataset.num_tokens < seq_len + 1:
            raise DataError(
                f"dataset {dataset.prefix} has {dataset.num_tokens} tokens, fewer than the "
                f"seq_len + 1 = {seq_len + 1} one sequence needs (data.seq_len)."
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.seed = seed
        self.samples_per_epoch = (dataset.num_tokens - 1) // seq_len
        self.epoch = 0
        self.offset = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`; only the current epoch's is kept (8 bytes per sample)."""
        if epoch != self._permutation_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = rng.permutation(self.samples_per_epoch)
            self._permutation_epoch = epoch
        return self._permutation

    def _draw(self, count: int) -> np.ndarray:
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

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s slice of the next global batch of `batch_size * world` samples.

        Returns (inputs_BS, labels_BS), int64 tensors of shape (batch_size, seq_len), where
        labels_BS[b, s] is the token after inputs_BS[b, s].
        """
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise DataError(
                f"next_batch needs batch_size >= 1 and 0 <= rank < world; got batch_size "
                f"{batch_size}, rank {rank}, world {world}."
            )
        samples = self._draw(batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
        span = self.seq_len + 1
        tokens_BT = np.empty((batch_size, span), dtype=np.int64)
        for row, sample in enumerate(samples):
            tokens_BT[row] = self.dataset.read_tokens(int(sample) * self.seq_len, span)
        tokens = torch.from_numpy(tokens_BT)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

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
        """Continue from a saved position; the data, seq_len and seed must be those it was saved with."""
        for key in ("seed", "seq_len", "samples_per_epoch"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"the saved sampler state has {key} {state.get(key)}, but this run's sampler over "
                    f"{self.dataset.prefix} has {getattr(self, key)}: it cannot resume the same order."
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.samples_per_epoch:
            raise DataError(
                f"the saved sampler position (epoch {epoch}, offset {offset}) is outside "
                f"0 <= offset < {self.samples_per_epoch} samples per epoch."
            )
        self.epoch, self.offset = epoch, offset

"""Parameter initialisation keyed by parameter name, so every layout starts from the same weights.

A rank that builds only its pipeline stage and its slice of the experts draws exactly the values the
single-process model draws for those parameters: each tensor (each expert's matrix, for the 3-D
expert stacks) gets its own generator seeded from (seed, name, expert index). Without this, a
multi-process run could never be compared with a single-process run of the same seed.
"""

from __future__ import annotations

import zlib

import torch


def _generator(seed: int, key: str) -> torch.Generator:
    # crc32 is stable across processes and Python versions, unlike hash().
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def normal_init_(tensor: torch.Tensor, name: str, seed: int, std: float, first_expert: int | None = None) -> None:
    """Fill `tensor` with N(0, std²) drawn from a generator keyed by `name`.

    For an expert stack [E_local, out, in] holding experts first_expert..first_expert+E_local-1,
    each slice is drawn with the key `name[expert]`, so a slice equals the full stack's slice.
    """
    if first_expert is None:
        values = torch.empty(tensor.shape).normal_(0.0, std, generator=_generator(seed, name))
        tensor.copy_(values)
        return
    for local, matrix in enumerate(tensor.unbind(0)):
        values = torch.empty(matrix.shape).normal_(0.0, std, generator=_generator(seed, f"{name}[{first_expert + local}]"))
        matrix.copy_(values)

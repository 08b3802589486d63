"""Selective recomputation (K2 §2.4.3): cheap, large stages keep only their inputs for
backward and run again there.

`recomputed(enabled, fn, *inputs)` wraps a region in non-reentrant activation checkpointing: the
region's inputs are saved, what happens inside is not, and backward replays `fn`. Replaying the
same float operations gives the same values, so gradients equal the run without recomputation bit
for bit. Regions hold no collective (the expert all-to-all stays outside them), so a replay never
talks to another rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(enabled: bool, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs), recomputed in backward instead of saved when `enabled` (and autograd records)."""
    if not enabled or not torch.is_grad_enabled():
        return fn(*inputs)
    return checkpoint(fn, *inputs, use_reentrant=False)

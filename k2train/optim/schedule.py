"""The WSD learning-rate schedule (K2 §2.5): warm-up, stable, decay.

K2: 500 linear warm-up steps, a constant 2e-4 for 10T tokens, then a cosine decay to 2e-5 over 5.5T
tokens. Steps are optimizer steps counted from 0. Warm-up starts at lr/warmup_steps (not 0, so the
first step already moves the weights) and reaches lr at its last step; after the decay the rate
stays at min_lr.
"""

from __future__ import annotations

import math

from k2train.config.schema import OptimizerConfig


def wsd_lr(step: int, lr: float, min_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based).

    step < warmup:                      lr · (step + 1) / warmup
    warmup <= step < warmup + stable:   lr
    next decay_steps steps:             min_lr + (lr - min_lr) · (1 + cos(π·t)) / 2,
                                        t = (step - warmup - stable) / decay
    afterwards:                         min_lr
    """
    if step < 0:
        raise ValueError(f"Learning-rate step {step} must be non-negative.")
    for name, value in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps), ("decay_steps", decay_steps)):
        if value < 0:
            raise ValueError(f"WSD {name}={value} must be non-negative (optimizer.{name}).")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    into_decay = step - warmup_steps - stable_steps
    if into_decay < 0:
        return lr
    if into_decay < decay_steps:
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * into_decay / decay_steps))
    return min_lr


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    """`wsd_lr` with the config's lr, min_lr and phase lengths."""
    return wsd_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.stable_steps, cfg.decay_steps)

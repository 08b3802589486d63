"""Every memory feature on (FP8 storage, recomputation, activation and optimizer-state offload)
trains like every feature off: 50 steps of the tiny model, losses within a stated tolerance.

Recomputation and both offloads are exact; FP8 storage perturbs the weight gradients of the
up-projections by its rounding (K2 §2.4.3 reports no measurable loss increase), so the runs drift
apart slowly and are compared by their loss over the last steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiproc import tiny_rank

ROOT = Path(__file__).parents[1]
STEPS = 50
LAST = 10  # the runs are compared by their mean loss over the last LAST steps
TOLERANCE = 0.02  # relative
BASE = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1", "train.global_batch_tokens=512",
        f"train.steps={STEPS}", "optimizer.warmup_steps=5", "optimizer.stable_steps=25", "optimizer.decay_steps=20"]
ALL_ON = ["memory.fp8_activations=true", "memory.selective_recompute=true", "memory.activation_offload=true",
          "memory.optimizer_offload=true"]


def train_losses(overrides: list[str], data: str) -> list[float]:
    """The per-step losses of the tiny config trained STEPS steps in this process."""
    from k2train.optim.schedule import lr_at
    from parallel.state import LaunchEnv

    cfg, state, runner = tiny_rank(BASE + overrides, data, env=LaunchEnv(rank=0, world_size=1, local_rank=0))
    losses = []
    for step in range(1, STEPS + 1):
        result = runner.forward_backward()
        runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(lr_at(step - 1, cfg.optimizer), result.max_logits_LH)
        runner.update_router_biases(result.counts_ME)
        losses.append(result.loss)
    return losses


def loss_gap(off: list[float], on: list[float]) -> float:
    """Relative difference of the mean loss over the last LAST steps."""
    mean_off, mean_on = sum(off[-LAST:]) / LAST, sum(on[-LAST:]) / LAST
    return abs(mean_on - mean_off) / mean_off


def json_corpus(directory: Path) -> str:
    """A fixed small corpus (the standard library's json package), tokenised byte by byte."""
    from k2train.data.prepare import prepare_dataset

    prefix = directory / "json"
    prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), prefix, "byte")
    return str(prefix)


@pytest.mark.timeout(600)
def test_all_memory_features_train_like_none(tmp_path):
    data = json_corpus(tmp_path)
    off = train_losses([], data)
    on = train_losses(ALL_ON, data)
    gap = loss_gap(off, on)
    print(f"50-step tiny run: mean loss of the last {LAST} steps {sum(off[-LAST:]) / LAST:.4f} with no memory "
          f"feature, {sum(on[-LAST:]) / LAST:.4f} with all on: gap {gap:.2%} (tolerance {TOLERANCE:.0%})")
    assert off[-1] < 0.7 * off[0]  # the comparison is between runs that learn
    assert on[0] == pytest.approx(off[0], rel=1e-6)  # FP8 storage changes no forward
    assert gap <= TOLERANCE, f"all-features run ends {gap:.2%} from the plain run (tolerance {TOLERANCE:.0%})"

"""Bytes saved for backward per token by one MoE decoder layer, per memory feature (K2 §2.4.3).

For the tiny config and for the `k2_1t` shapes (one MoE layer as an EP rank holds it: 24 of the 384
experts, bf16), counted exactly by the saved-tensor hooks (`k2train/memory/saved.py`), with:
none; recompute; recompute + FP8; recompute + FP8 + offload (what stays on the device, and what
waits in host memory).

`k2_1t` runs here at reduced sequence lengths. Per token, everything a layer saves is independent
of the sequence length except the eager attention's probabilities (heads × S values per token) and
what is saved once per micro-batch (the router's float32 weight copy), so three lengths give the
layer's exact K + b·S + c·S², evaluated at the config's seq_len. On a GPU the Triton attention saves
no probabilities (only its output and a log-sum-exp per head and query): that term is the CPU
path's, and is printed apart, like the per-micro-batch part.

Then the 50-step tiny run with all memory features on against all off (tests/test_memory_training.py),
with its loss gap and tolerance. Not a test: `make bench-memory` prints numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2train.config.load import load_config
from k2train.memory.layer_probe import FEATURES, moe_layer, saved_per_token
from k2train.memory.policy import SavePolicy

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def measure(cfg, local_experts: int, seq_lens: list[int], batch: int, dtype: torch.dtype) -> dict[str, tuple]:
    """{feature: (device, offloaded) bytes/token at each seq_len}."""
    torch.manual_seed(0)
    results = {}
    for name, (fp8, recompute, offload) in FEATURES.items():
        model = moe_layer(cfg, local_experts, policy=SavePolicy(fp8=fp8, recompute=recompute)).to(dtype)
        per_len = []
        for seq in seq_lens:
            x_BSD = torch.randn(batch, seq, cfg.hidden_size, dtype=dtype, requires_grad=True)
            per_len.append(saved_per_token(model, x_BSD, offload))
        results[name] = per_len
    return results


def at_length(per_token: list[float], seq_lens: list[int], seq: int) -> tuple[float, float, float]:
    """Per token at S = seq from measurements at seq_lens (batch 1): the layer's bytes are
    K + b·S + c·S² (K per micro-batch, e.g. the router's float32 weight copy; b per token; c·S per
    token for the eager attention's probabilities), solved exactly from three lengths.
    Returns (bytes per token, its per-micro-batch part K/S, its attention part c·S)."""
    if len(seq_lens) == 1:
        return per_token[0], 0.0, 0.0
    lens = torch.tensor(seq_lens, dtype=torch.float64)
    totals = torch.tensor(per_token, dtype=torch.float64) * lens
    K, b, c = torch.linalg.solve(torch.stack([torch.ones_like(lens), lens, lens**2], dim=1), totals).tolist()
    return K / seq + b + c * seq, K / seq, c * seq


def print_table(title: str, results: dict, seq_lens: list[int], seq: int) -> None:
    print(f"\n{title}")
    print(f"  {'features':<28}{'device B/token':>16}{'offloaded B/token':>19}"
          f"{'  of which: per micro-batch':>28}{'eager attention probs':>23}")
    for name, per_len in results.items():
        device, k_dev, s_dev = at_length([r["device"] for r in per_len], seq_lens, seq)
        offloaded, k_off, s_off = at_length([r["offloaded"] for r in per_len], seq_lens, seq)
        print(f"  {name:<28}{device:>16,.0f}{offloaded:>19,.0f}{k_dev + k_off:>28,.0f}{s_dev + s_off:>23,.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-k2", action="store_true", help="only the tiny config (k2_1t needs ~3 GB and a minute)")
    parser.add_argument("--skip-training", action="store_true", help="no 50-step loss comparison")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tiny = load_config(ROOT / "configs" / "k2_tiny.yaml")
    seq = tiny.data.seq_len
    print_table(f"k2_tiny, one MoE layer ({tiny.model.num_experts} experts, float32, seq_len {seq})",
                measure(tiny.model, tiny.model.num_experts, [seq], 2, torch.float32), [seq], seq)

    if not args.skip_k2:
        k2 = load_config(ROOT / "configs" / "k2_1t.yaml")
        local = k2.model.num_experts // k2.parallel.ep
        lens = [32, 64, 128]
        started = time.perf_counter()
        results = measure(k2.model, local, lens, 1, getattr(torch, k2.train.param_dtype))
        print_table(f"k2_1t, one MoE layer on one EP rank ({local} of {k2.model.num_experts} experts, "
                    f"{k2.train.param_dtype}), measured at S = {lens}, evaluated at seq_len {k2.data.seq_len}",
                    results, lens, k2.data.seq_len)
        print(f"  ({time.perf_counter() - started:.0f} s)")

    if not args.skip_training:
        import test_memory_training as run

        with tempfile.TemporaryDirectory() as tmp:
            data = run.json_corpus(Path(tmp))
            off, on = run.train_losses([], data), run.train_losses(run.ALL_ON, data)
        gap = run.loss_gap(off, on)
        print(f"\n{run.STEPS}-step tiny run, mean loss of the last {run.LAST} steps: "
              f"{sum(off[-run.LAST:]) / run.LAST:.4f} all features off, {sum(on[-run.LAST:]) / run.LAST:.4f} "
              f"all on; gap {gap:.2%} (test tolerance {run.TOLERANCE:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of `benchmarks/cpu_optimizer.py`, printed by rank 0 from every rank's results: the
set-up, per rank and group step time, CPU time, Newton-Schulz work and bytes sent, then the checks
(the byte meter against ShardGroup's own sizes, the collectives per step, how far the methods'
parameters end up from ours). Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics

from torch import Tensor

from k2train.config.schema import OptimizerConfig
from parallel.zero1.ownership import newton_schulz_flops

METHODS = ("ours", "moonlight", "deepspeed", "ds-k2scale")  # the report's column order


def change_distance(initial: list[Tensor], ref: list[Tensor], other: list[Tensor]) -> list[float]:
    """Per matrix: ‖W_other − W_ref‖ / ‖W_ref − W_0‖, the relative L2 distance of the parameter change."""
    return [((b - a).norm() / (a - w).norm()).item() for w, a, b in zip(initial, ref, other)]


def _distance_line(label: str, distances: list[float]) -> str:
    return f"  {label:<44} max {max(distances):.2e}  mean {statistics.mean(distances):.2e}"


def print_table(out: dict) -> None:
    """Per rank and for the group: step time, CPU time, Newton-Schulz work and bytes sent."""
    results = out["results"]
    names = [name for name in METHODS if name in results[0]["times"]]
    group = {n: group_totals(results, n) for n in names}
    blocks = [
        ("step time, wall (s)", lambda res, n: f"{_median(res['times'][n], 0):.3f}",
         lambda n: f"{group[n]['wall']:.3f}"),
        ("step time, CPU of the rank (s)", lambda res, n: f"{_median(res['times'][n], 1):.3f}",
         lambda n: f"{group[n]['cpu']:.3f}"),
        ("Newton-Schulz GFLOP (matrices orthogonalised)",
         lambda res, n: f"{sum(res['ns'][n]) / 1e9:.2f} ({len(res['ns'][n])})",
         lambda n: f"{group[n]['flops'] / 1e9:.2f} ({group[n]['matrices']})"),
        ("MB sent per step", lambda res, n: f"{res['sent'][n] / 1e6:.2f}", lambda n: f"{group[n]['bytes'] / 1e6:.2f}"),
    ]
    for title, cell, total in blocks:
        print(f"{title:<48}" + "".join(f"{n:>14}" for n in names))
        for rank, res in enumerate(results):
            print(f"  rank {rank:<41}" + "".join(f"{cell(res, n):>14}" for n in names))
        print(f"  {'group':<46}" + "".join(f"{total(n):>14}" for n in names))
    print("group: wall and CPU = median over steps of the slowest rank (CPU: the step's critical path with a\n"
          "core per rank); FLOPs, matrices and bytes = sums over ranks. DeepSpeed's FLOPs are counted as the\n"
          "standard iteration on the matrices it orthogonalised, whatever its ns_method.")
    for name in names[1:]:
        r = {k: group[name][k] / group["ours"][k] for k in ("wall", "cpu", "flops", "busiest", "bytes")}
        print(f"  {name} / ours: wall {r['wall']:.2f}x, CPU critical path {r['cpu']:.2f}x, Newton-Schulz FLOPs "
              f"{r['flops']:.2f}x (busiest rank {r['busiest']:.2f}x), bytes {r['bytes']:.2f}x")


def _median(samples: list[tuple[float, float]], index: int) -> float:
    return statistics.median(sample[index] for sample in samples)


def group_totals(results: list[dict], name: str) -> dict[str, float]:
    """Wall and CPU: median over steps of the slowest rank; FLOPs, matrices, bytes: sums over ranks."""
    steps = list(zip(*(res["times"][name] for res in results)))
    return dict(
        wall=statistics.median(max(t[0] for t in step) for step in steps),
        cpu=statistics.median(max(t[1] for t in step) for step in steps),
        flops=sum(sum(res["ns"][name]) for res in results),
        busiest=max(sum(res["ns"][name]) for res in results),
        matrices=sum(len(res["ns"][name]) for res in results),
        bytes=sum(res["sent"][name] for res in results),
    )


def print_header(out: dict, args: argparse.Namespace) -> None:
    m, initial, size = out["model"], out["initial"], out["size"]
    once = sum(newton_schulz_flops(*w.shape, OptimizerConfig().ns_steps) for w in initial)
    elements = sum(w.numel() for w in initial)
    print(f"\nOptimizer step, DP {size} on gloo: {size} processes x 1 thread on {os.cpu_count()} cores, "
          f"Newton-Schulz in {args.ns_dtype} (ours, moonlight), lr {args.lr}, weight decay 0.1")
    print(f"matrices: {len(initial)} Muon matrices of a K2-shaped model (hidden {m.hidden_size}, "
          f"{m.num_layers} layers, {m.num_experts} experts of {m.moe_intermediate_size}), {elements / 1e6:.2f} M "
          f"elements; Newton-Schulz of each once: {once / 1e9:.2f} GFLOP")
    print(f"median of {args.steps} steps after {args.warmup} warm-up. With fewer cores than ranks the processes "
          "time-share:\nwall time follows the work of all ranks together; a rank's CPU time is its own work, and "
          "the slowest\nrank's is the step's critical path with a core per rank.")
    print("bytes: collectives under a ring model (reduce_scatter and all_gather (G-1)/G of the buffer, all_reduce "
          "2(G-1)/G), point-to-point exactly")
    for name, note in out["notes"].items():
        print(f"{name + ':':<12}{note}")
    print()


def print_checks(out: dict, args: argparse.Namespace) -> None:
    """The meter against ShardGroup's own sizes, the collectives, and how far the results are apart."""
    results, initial, finals = out["results"], out["initial"], out["finals"]
    expected, counted = [r["ours_expected_bytes"] for r in results], [r["sent"]["ours"] for r in results]
    print(f"meter check: ours counted {counted[0] / 1e6:.3f} MB per rank, ShardGroup's buffers give "
          f"2(G-1)·region·4 = {expected[0] / 1e6:.3f} MB: {'equal' if counted == expected else 'DIFFERENT'}")
    print("\ncollectives per step (rank 0):")
    for name, calls in results[0]["calls"].items():
        print(f"  {name:<11} " + ", ".join(f"{op} x{count}" for op, count in sorted(calls.items())))
    ours, moon = finals["ours"], finals["moonlight"]
    equal = max(((b - a).abs().max() / a.abs().max()).item() for a, b in zip(ours, moon))
    print(f"\nafter {args.warmup + args.steps} steps from the same parameters and gradients:")
    print(f"  moonlight vs ours: max |W_moonlight - W_ours| / max |W_ours| over matrices = {equal:.2e}")
    print(_distance_line("moonlight vs ours, parameter change:", change_distance(initial, ours, moon)))
    for name in ("deepspeed", "ds-k2scale"):
        if name in finals:
            print(_distance_line(f"{name} vs ours, parameter change:", change_distance(initial, ours, finals[name])))
    print(_distance_line(f"ours with {out['other']} Newton-Schulz vs ours:",
                         change_distance(initial, ours, finals["reference"])))
    print("  relative L2 per matrix, ‖W_x − W_ours‖ / ‖W_ours − W_0‖, max and mean over matrices;\n"
          "  the last line is the size of a change of Newton-Schulz precision alone.")
    if "deepspeed" in finals:
        print("  deepspeed's distance is its own update scale; ds-k2scale has K2's, so what is left is rounding\n"
              "  (its Newton-Schulz in its own form and precision, its EMA momentum).")

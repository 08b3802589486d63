"""The expert all-to-all hidden by parallel.overlap=ep (K2 §2.4), measured on a slow network made on
this machine.

Not a test: `make bench-overlap` (as root) prints numbers. Between gloo processes on a plain
loopback an all-to-all is a memory copy that costs CPU, not wall time, so overlap cannot show. The
benchmark creates its own network namespace whose loopback is rate-limited with a tbf qdisc (a
shaped loopback carries its configured rate, and waiting on it costs no CPU), runs each layout
there with overlap off and on (alternating, `--repeats` times), first on the unshaped and then on
the shaped loopback, and removes the namespace at the end, also on failure. Only loopback
addresses are used.

Per rank it prints the micro-batch loop's time (forwards, backwards and their exchanges: the part
overlap changes), the whole step's, the compute time (the loop on the unshaped loopback), the link
time (one step's all-to-alls replayed back to back with no compute), the exposed wait (loop minus
compute) and the best loop max(compute, link). Per layout it then sets `k2train plan`'s time model
against the slowest rank's loop, overlap off and on (`planned_loops`). Timings are medians over the
steps after the first, then over the repeats.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
HERE = Path(__file__).resolve().parent
NAMESPACE = "k2bench-overlap"
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.plots=false"]
# Longer sequences than the tiny config's default, so each exchange carries enough bytes to be
# slowed by the shaped link; 8 micro-batches per data rank.
# Wider than the tiny config too, so compute is mostly in torch kernels rather than in Python.
SIZES = ["data.seq_len=128", "train.micro_batch_size=2", "train.global_batch_tokens={tokens}",
         "model.hidden_size=256", "model.moe_intermediate_size=256", "model.dense_intermediate_size=512"]
LAYOUTS = {"pp2xvp2xep2xdp2 (8 processes)": (2, 2, 2, 2), "pp2xep2 (4 processes)": (2, 1, 2, 1),
           "pp1xep4 (4 processes)": (1, 1, 4, 1), "pp1xep2 (2 processes)": (1, 1, 2, 1)}


def measure(payload: dict) -> dict:
    """On one rank: take the steps and time each step and its micro-batch loop."""
    from multiproc import tiny_rank

    cfg, state, runner = tiny_rank(payload["overrides"], payload["data"])
    loop_times: list[float] = []
    name = "_run_local" if runner.schedule is None else "_run_pipeline"
    run_loop = getattr(runner, name)

    def timed_loop(*args):
        start = time.perf_counter()
        out = run_loop(*args)
        loop_times.append(time.perf_counter() - start)
        return out

    setattr(runner, name, timed_loop)
    step_times = []
    for _ in range(payload["steps"]):
        torch_barrier()
        start = time.perf_counter()
        result = runner.forward_backward()
        runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(1e-3, result.max_logits_LH)
        runner.update_router_biases(result.counts_ME)
        step_times.append(time.perf_counter() - start)
    torch_barrier()
    import torch.distributed as dist

    comm = exchanges_alone(runner) if payload["replay"] else 0.0
    dist.destroy_process_group()
    return dict(loop=statistics.median(loop_times[1:]), step=statistics.median(step_times[1:]), comm=comm)


def exchanges_alone(runner) -> float:
    """The time the link needs for one step's all-to-alls with no compute between them: record every
    exchange of one more step (shapes, splits, group), then replay them back to back."""
    import torch
    import torch.distributed as dist

    import parallel.experts as ep

    recorded, exchange = [], ep.all_to_all

    def recording(out, inp, out_splits, in_splits, group, turns):
        recorded.append((out.shape, inp.shape, out.dtype, out_splits, in_splits, group))
        exchange(out, inp, out_splits, in_splits, group, turns)

    ep.all_to_all = recording
    try:
        runner.forward_backward()
    finally:
        ep.all_to_all = exchange
    buffers = [(torch.zeros(o, dtype=d), torch.zeros(i, dtype=d), os_, is_, g) for o, i, d, os_, is_, g in recorded]
    times = []
    for _ in range(3):
        torch_barrier()
        start = time.perf_counter()
        for out, inp, out_splits, in_splits, group in buffers:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def layout_overrides(pp: int, vp: int, ep: int, dp: int, overlap: str) -> list[str]:
    micro = 8  # the first forward and the last backward of a rank run unpaired: a long steady state
    tokens = 128 * 2 * micro * dp
    return [*QUIET, *[s.format(tokens=tokens) for s in SIZES], f"parallel.pp={pp}", f"parallel.vp={vp}",
            f"parallel.ep={ep}", f"parallel.dp={dp}", f"parallel.overlap={overlap}"]


def run_layout(pp: int, vp: int, ep: int, dp: int, overlap: str, steps: int, data: str) -> list[dict]:
    from multiproc import run_world

    return run_world(pp * ep * dp, "cpu_overlap:measure",
                     dict(overrides=layout_overrides(pp, vp, ep, dp, overlap), data=data, steps=steps,
                          replay=overlap == "none"), timeout=900)


def planned_loops(layout: tuple[int, int, int, int], unshaped_loop_s: float, rate_bytes_s: float) -> dict[str, float]:
    """`k2train plan`'s schedule time (as built, without the update after it) for this layout, overlap
    off and on, calibrated to this machine: the compute rate chosen so that the plan's unshaped
    schedule (compute and bubble, no link time) equals the measured plain loop on the unshaped
    loopback; the link is the shaped loopback, one link all ranks share, so rate / world per rank."""
    from dataclasses import replace

    from k2train.config.load import load_config
    from parallel.layout import make_layout
    from parallel.plan.planner import make_plan
    from parallel.plan.cost import HARDWARE

    pp, vp, ep, dp = layout
    world = pp * ep * dp

    def schedule_s(overlap: str, hw) -> float:
        cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", layout_overrides(pp, vp, ep, dp, overlap))
        lay = make_layout(world, cfg.parallel, num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
                          micro_batches=None)
        plan = make_plan(cfg, lay, hw)
        return plan.step_built_s - max(r.update_s for r in plan.ranks)

    fast = replace(HARDWARE["h800"], peak_tflops=1.0, efficiency=1.0, nvlink_gbs=1e12, network_gbs=1e12, pcie_gbs=1e12)
    rate = schedule_s("none", fast) / unshaped_loop_s  # TFLOP/s that make the plan's compute this CPU's
    shaped = replace(fast, peak_tflops=rate, nvlink_gbs=rate_bytes_s / world / 1e9,
                     network_gbs=rate_bytes_s / world / 1e9)
    return {overlap: schedule_s(overlap, shaped) for overlap in ("none", "ep")}


def rate_bytes(rate: str) -> float:
    """A tc rate ("500mbit", "1gbit") in bytes per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8
    raise ValueError(f"--rate {rate!r}: expected a number followed by kbit, mbit or gbit.")


def inside(args) -> None:
    """In the namespace: every layout on the unshaped loopback, then on the shaped one."""
    from k2train.data.prepare import prepare_dataset
    import json

    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "sources")
        prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), Path(data), "byte")
        results: dict[tuple[str, str, str], list[dict]] = {}
        for link in ("unshaped", "shaped"):
            if link == "shaped":
                _run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", args.rate,
                      "burst", args.burst, "latency", "2s"])  # a long queue: no drops, no TCP retransmits
            for name, layout in _chosen(args).items():
                runs: dict[str, list[list[dict]]] = {"none": [], "ep": []}
                for _ in range(args.repeats):  # off and on alternate, so a load change hits both
                    for overlap in ("none", "ep"):
                        start = time.perf_counter()
                        runs[overlap].append(run_layout(*layout, overlap, args.steps, data))
                        print(f"  {name}, {link}, overlap={overlap}: {time.perf_counter() - start:.0f} s", flush=True)
                for overlap, reps in runs.items():
                    results[name, link, overlap] = [
                        {k: statistics.median(rep[rank][k] for rep in reps) for k in reps[0][rank]}
                        for rank in range(len(reps[0]))]
    report(results, args)


def report(results: dict, args) -> None:
    print(f"\nk2_tiny (hidden 256), seq 128 x 2 per micro-batch, 8 micro-batches per data rank, {args.steps} steps "
          f"(median of steps 2+, then of {args.repeats} runs), loopback shaped to {args.rate} (tbf burst {args.burst}); times in s.\n"
          "loop: the micro-batches' forwards, backwards and exchanges; compute: the loop on the unshaped "
          "loopback; link: one step's all-to-alls replayed back to back on the shaped loopback with no compute; "
          "exposed: loop - compute; best: max(compute, link), the loop if every exchange hid under compute "
          "or the link never idled")
    for name in _chosen(args):
        print(f"\n{name}")
        print("  rank  overlap  step    loop    compute  link    exposed  best    loop/plain  exposed/plain  best/plain")
        plain = results[name, "shaped", "none"]
        for overlap in ("none", "ep"):
            for rank, got in enumerate(results[name, "shaped", overlap]):
                c = results[name, "unshaped", overlap][rank]["loop"]
                c_plain = results[name, "unshaped", "none"][rank]["loop"]
                link, base = plain[rank]["comm"], plain[rank]["loop"]
                exposed, best = got["loop"] - c, max(c, link)
                print(f"  {rank:4d}  {overlap:7s}  {got['step']:.3f}  {got['loop']:.3f}  {c:.3f}    {link:.3f}   "
                      f"{exposed:.3f}    {best:.3f}   {got['loop'] / base:.2f}        "
                      f"{exposed / (base - c_plain):.2f}           {best / base:.2f}")
        share = statistics.mean((p["loop"] - u["loop"]) / p["loop"]
                                for p, u in zip(plain, results[name, "unshaped", "none"]))
        print(f"  mean share of the plain loop spent waiting on the all-to-all: {share:.2f}")
        unshaped = max(r["loop"] for r in results[name, "unshaped", "none"])
        planned = planned_loops(LAYOUTS[name], unshaped, rate_bytes(args.rate))
        for overlap in ("none", "ep"):
            measured = max(r["loop"] for r in results[name, "shaped", overlap])
            print(f"  plan (as built, calibrated) overlap={overlap}: {planned[overlap]:.3f} s, measured slowest rank "
                  f"{measured:.3f} s, plan/measured {planned[overlap] / measured:.2f}")


def _chosen(args) -> dict[str, tuple[int, int, int, int]]:
    return {name: layout for name, layout in LAYOUTS.items() if args.only in name}


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True)


def outside(args) -> None:
    """Create the namespace, run this script inside it, and remove the namespace whatever happens."""
    if os.geteuid() != 0:
        sys.exit("bench-overlap creates a network namespace (ip netns) and needs root.")
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)  # a leftover of a killed run
    _run(["ip", "netns", "add", NAMESPACE])
    # SIGTERM becomes an exception, so the finally below removes the namespace then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        _run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"])
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "tests"), os.environ.get("PYTHONPATH", "")]))
        subprocess.run(["ip", "netns", "exec", NAMESPACE, sys.executable, __file__, "--inside",
                        "--rate", args.rate, "--burst", args.burst, "--steps", str(args.steps), "--repeats", str(args.repeats),
                        "--only", args.only], check=True, env=env)
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="500mbit", help="tbf rate of the shaped loopback")
    # Just above the loopback's 64 KiB packets: a larger bucket refills during compute and lets each
    # exchange's first bytes through at once, hiding part of the link time from the plain run.
    parser.add_argument("--burst", default="80kb", help="tbf burst of the shaped loopback")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating off and on")
    parser.add_argument("--only", default="", help="run only the layouts whose name contains this")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
    else:
        outside(args)


if __name__ == "__main__":
    main()

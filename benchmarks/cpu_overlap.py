"""The expert all-to-all hidden by parallel.overlap=ep (K2 §2.4), measured on a slow network made on
this machine.

Not a test: `make bench-overlap` (as root) prints numbers. Between gloo processes on a plain
loopback an all-to-all is a memory copy that costs CPU, not wall time, and a rank waiting on the
network lends its core to another, so overlap cannot show. The benchmark builds a small cluster on
this machine (benchmarks/shaped_cluster.py): a network namespace in which every rank's outgoing
traffic is shaped to the link rate (waiting on it costs no CPU) and every rank has its own share of
the cores. Each layout's link rate is calibrated so that the plain step waits `--share` of its time
on the all-to-all (or fixed by `--rate`). It then runs the layout there with overlap off and on
(alternating, `--repeats` times), each setting on the unshaped and then right after on the shaped
links, and removes the namespace and the cgroups at the end, also on failure. Only loopback
addresses are used.

Per rank it prints the micro-batch loop's time (forwards, backwards and their exchanges: the part
overlap changes), the whole step's, the compute time (the loop on the unshaped loopback), the link
time (one step's all-to-alls replayed back to back with no compute), the exposed wait (loop minus
compute) and the best loop max(compute, link). Per layout it then sets `k2train plan`'s time model
against the slowest rank's loop, overlap off and on (`planned_loops`). Timings are medians over the
steps after the first, then over the repeats. With `--wgrad` (`make bench-overlap WGRAD=1`) a third
setting alternates with the two: overlap on with the experts' weight gradients computed in place
(parallel.delay_wgrad=false), so the weight-gradient split is measured side by side in one run.
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
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.plots=false"]
# Longer sequences than the tiny config's default, so each exchange carries enough bytes to be
# slowed by the shaped link. Wider than the tiny config too, so compute is mostly in torch kernels
# rather than in Python. Two layers per virtual stage and 4 of 8 experts per token, so that a stage's
# expert exchanges carry 8 times the bytes of its pipeline send (the tiny config's shape: 2 times;
# k2_1t's, 2 layers of 8 experts per token per virtual stage: about 30 times); otherwise the pipeline sends' latency,
# which no schedule hides, would stand for a third of the link's time. Every layer is MoE, as 60 of
# K2's 61 are (§2.3): with a dense first layer, one of the bench's 4 virtual stages (one of k2_1t's
# 32) would hold a single MoE layer, and where a pair matches it with a full stage, half of the other
# task's exchanges would have nothing to hide under.
# Newton-Schulz in float32: the update after the loop counts in the step, and on a CPU without native
# bfloat16 matrix instructions (AVX2 only) torch multiplies bfloat16 far slower than float32; there a
# bfloat16 update took 32 s of a 44.5 s PP1xEP2 step whose loop took 12.0 s.
SIZES = ["optimizer.ns_dtype=float32", "data.seq_len=128", "train.micro_batch_size=2", "train.global_batch_tokens={tokens}",
         "model.hidden_size=256", "model.moe_intermediate_size=256",
         "model.num_layers=8", "model.first_dense_layers=0", "model.experts_per_token=4"]
# Micro-batches per rank and step (`--micro` sets every layout's). Warm-up forwards and cool-down
# backwards run unpaired, so a long steady state; an interleaved pipeline has the longest warm-up:
# on pipeline rank 0 of PP2xV2, 5 forwards and 5 backwards of its 2 x 2 x micro-batches operations.
# At 16 those were 10 of 64 and about half of what overlap left exposed there (`--waits`); at 32,
# 10 of 128. K2's steps hold far more micro-batches than pipeline stages (the warm-up's share is
# smaller still). 32 micro-batches of half the size were worse: the overlap's cost per micro-batch
# grew and the link's share of the plain step fell below 0.40.
MICRO = 16
LAYOUT_MICRO = {"pp2xvp2xep2xdp2 (8 processes)": 32}
# What each setting adds to the layout's config: overlap off, on, and on with the experts' weight
# gradients computed in place rather than under the backward's exchange (`--wgrad`).
SETTINGS = {"none": ["parallel.overlap=none"], "ep": ["parallel.overlap=ep"],
            "ep-wgrad-now": ["parallel.overlap=ep", "parallel.delay_wgrad=false"]}
LINKS = {"fifo": "each link one queue, served in order", "fair": "each link shared fairly by its connections"}
LAYOUTS = {"pp2xvp2xep2xdp2 (8 processes)": (2, 2, 2, 2), "pp2xep2 (4 processes)": (2, 1, 2, 1),
           "pp1xep4 (4 processes)": (1, 1, 4, 1), "pp1xep2 (2 processes)": (1, 1, 2, 1)}


def measure(payload: dict) -> dict:
    """On one rank: take the steps and time each step and its micro-batch loop (and with `waits`,
    where the rank waits, over the steps after the first)."""
    from multiproc import tiny_rank
    from overlap_probes import WaitRecorder, exchanges_alone
    from shaped_cluster import join

    join(int(os.environ["RANK"]), payload["cpu_share"])
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
    waits = WaitRecorder(state.collectives, runner.turns) if payload["waits"] else None
    if waits is not None:
        waits.install()
    step_times = []
    for step in range(payload["steps"]):
        if step == 1 and waits is not None:
            waits.reset()
        torch_barrier()
        start = time.perf_counter()
        result = runner.forward_backward()
        runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(1e-3, result.max_logits_LH)
        runner.update_router_biases(result.counts_ME)
        step_times.append(time.perf_counter() - start)
    torch_barrier()
    import torch.distributed as dist

    waited = waits.per_step(payload["steps"] - 1) if waits is not None else {}
    comm = exchanges_alone(runner, state.collectives, torch_barrier) if payload["replay"] else 0.0
    dist.destroy_process_group()
    return dict(loop=statistics.median(loop_times[1:]), step=statistics.median(step_times[1:]), comm=comm, **waited)


def torch_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def layout_overrides(pp: int, vp: int, ep: int, dp: int, setting: str, micro: int) -> list[str]:
    tokens = 128 * 2 * micro * dp * ep  # every EP rank reads its own micro-batches
    return [*QUIET, *[s.format(tokens=tokens) for s in SIZES], f"parallel.pp={pp}", f"parallel.vp={vp}",
            f"parallel.ep={ep}", f"parallel.dp={dp}", *SETTINGS[setting]]


def run_layout(pp: int, vp: int, ep: int, dp: int, overlap: str, steps: int, data: str, micro: int, replay: bool = False,
               waits: bool = False) -> list[dict]:
    """Every rank's timings; `replay`: also the link time of one step's all-to-alls alone; `waits`:
    also where it waited."""
    from multiproc import run_world

    world = pp * ep * dp
    return run_world(world, "cpu_overlap:measure",
                     dict(overrides=layout_overrides(pp, vp, ep, dp, overlap, micro), data=data, steps=steps,
                          replay=replay, waits=waits, cpu_share=cpu_share(world)), timeout=900)


def planned_loops(layout: tuple[int, int, int, int], unshaped_loop_s: float, rate_bytes_s: float,
                  link_s: float, micro: int) -> dict[tuple[str, str], float]:
    """`k2train plan`'s schedule time (as built, without the update after it) for this layout, overlap
    off and on, calibrated to this machine, keyed by (link, overlap). Compute: the rate chosen so
    that the plan's unshaped schedule (compute and bubble, no link time) equals the measured plain
    loop on the unshaped loopback. Link, every rank its own as the plan assumes: "shaped", the rate
    tc shapes it to; "replayed", the rate at which the slowest rank's replay (`link_s`) moved the
    plan's bytes, which also pays what a transfer costs beyond its bytes."""
    from dataclasses import replace

    from k2train.config.load import load_config
    from parallel.layout import make_layout
    from parallel.plan.planner import make_plan
    from parallel.plan.cost import HARDWARE

    pp, vp, ep, dp = layout

    def plan(overlap: str, hw):
        cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", layout_overrides(pp, vp, ep, dp, overlap, micro))
        lay = make_layout(pp * ep * dp, cfg.parallel, num_layers=cfg.model.num_layers,
                          num_experts=cfg.model.num_experts, micro_batches=None)
        return make_plan(cfg, lay, hw)

    def schedule_s(overlap: str, hw) -> float:
        built = plan(overlap, hw)
        return built.step_built_s - max(r.update_s for r in built.ranks)

    def linked(rate: float, link_bytes_s: float):
        return replace(fast, peak_tflops=rate, nvlink_gbs=link_bytes_s / 1e9, network_gbs=link_bytes_s / 1e9)

    fast = replace(HARDWARE["h800"], peak_tflops=1.0, efficiency=1.0, nvlink_gbs=1e12, network_gbs=1e12, pcie_gbs=1e12)
    rate = schedule_s("none", fast) / unshaped_loop_s  # TFLOP/s that make the plan's compute this CPU's
    a2a_s = max(t.seconds for r in plan("none", linked(rate, rate_bytes_s)).ranks for t in r.traffic
                if t.name == "EP all-to-all")
    rates = {"shaped": rate_bytes_s, "replayed": rate_bytes_s * a2a_s / link_s}
    return {(link, overlap): schedule_s(overlap, linked(rate, link_rate))
            for link, link_rate in rates.items() for overlap in ("none", "ep")}


def rate_bytes(rate: str) -> float:
    """A tc rate ("500mbit", "1gbit") in bytes per second."""
    from shaped_cluster import rate_bits

    return rate_bits(rate) / 8


def inside(args) -> None:
    """In the namespace: per layout, the link rate (calibrated unless `--rate` fixes it), then
    `--repeats` rounds in which every setting runs on the unshaped and on the shaped loopback, one
    right after the other, so that a setting's compute and its shaped loop meet the same load on a
    shared machine (the exposed wait is their difference)."""
    import json

    from k2train.data.prepare import prepare_dataset
    from shaped_cluster import ShapedCluster

    cluster = ShapedCluster(args.link == "fair")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "sources")
        prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), Path(data), "byte")
        results: dict[tuple[str, str, str], list[dict]] = {}
        rates: dict[str, str] = {}
        for name, layout in _chosen(args).items():
            micro = micro_batches(name, args)
            rate = rates[name] = (layout_rate(args.rate, layout) if args.rate
                                  else calibrated_rate(name, layout, cluster, args, data, micro))
            runs: dict[tuple[str, str], list[list[dict]]] = {
                (link, setting): [] for link in ("unshaped", "shaped") for setting in _settings(args)}
            for repeat in range(args.repeats):  # the settings alternate, so a load change hits them all
                for setting in _settings(args):
                    # unshaped first in one round, shaped first in the next: a drift hits both alike
                    for link in ("unshaped", "shaped")[:: 1 if repeat % 2 == 0 else -1]:
                        _link(cluster, link, rate, args.burst)
                        start = time.perf_counter()
                        replay = link == "shaped" and setting == "none"
                        runs[link, setting].append(run_layout(*layout, setting, args.steps, data, micro, replay, args.waits))
                        print(f"  {name}, {link}, overlap={setting}: {time.perf_counter() - start:.0f} s", flush=True)
            for (link, setting), reps in runs.items():
                results[name, link, setting] = [
                    {k: statistics.median(rep[rank][k] for rep in reps) for k in reps[0][rank]}
                    for rank in range(len(reps[0]))]
            cluster.unshape()
    report(results, rates, args)


def calibrated_rate(name: str, layout: tuple[int, int, int, int], cluster, args, data: str, micro: int) -> str:
    """The link rate at which the plain step waits `args.share` of its time on the all-to-all (the
    exchanges about as long as the compute), whatever this machine's speed and load: the plain
    schedule once unshaped and once at a first guess (150 mbit/s for the 8-process layout, scaled by
    the CPU share), and the guess scaled by how much longer the wait was than wanted. The wait grows
    as the rate falls, nearly in proportion (a transfer's latency is small beside its bytes here);
    the runs that follow print the share they had."""
    guess = layout_rate("150mbit", layout)
    loops = {}
    for link in ("unshaped", "shaped"):
        _link(cluster, link, guess, args.burst)
        loops[link] = run_layout(*layout, "none", args.steps, data, micro)
    step = statistics.mean(r["step"] for r in loops["unshaped"])
    wait = statistics.mean(s["loop"] - u["loop"] for s, u in zip(loops["shaped"], loops["unshaped"]))
    wanted = args.share * step / (1 - args.share)  # the wait that is `share` of the shaped step
    if wait <= 0:
        raise SystemExit(f"{name}: the plain loop on links at {guess} took no longer than unshaped; "
                         "the link cannot be calibrated (set --rate).")
    rate = f"{rate_bytes(guess) * 8 * wait / wanted / 1e3:.0f}kbit"
    print(f"  {name}: plain step {step:.3f} s unshaped, waited {wait:.3f} s at {guess}; "
          f"links at {rate} for a wait of {args.share:.2f} of the step", flush=True)
    return rate


def micro_batches(name: str, args) -> int:
    return args.micro or LAYOUT_MICRO.get(name, MICRO)


def _link(cluster, link: str, rate: str, burst: str) -> None:
    if link == "shaped":
        cluster.shape(rate, burst)
    else:
        cluster.unshape()


def cpu_share(world: int) -> float:
    """Every rank the same share of the cores, as if its own."""
    return min(1.0, (os.cpu_count() or 1) / world)


def layout_rate(rate: str, layout: tuple[int, int, int, int]) -> str:
    """`rate` is the 8-process layout's link (`--rate`); ranks with a larger CPU share compute faster, and get a
    link faster by as much, so every layout's link keeps the same speed relative to its compute."""
    pp, _, ep, dp = layout
    return f"{rate_bytes(rate) * 8 * cpu_share(pp * ep * dp) / cpu_share(8) / 1e3:.0f}kbit"


def report(results: dict, rates: dict[str, str], args) -> None:
    cores = os.cpu_count()
    print(f"\nk2_tiny (hidden 256, 8 MoE layers, 4 of 8 experts per token), seq 128 x 2 per micro-batch, "
          f"{args.steps} steps (median of steps 2+, then of {args.repeats} runs), every "
          f"rank given {cores}/ranks of the {cores} cores and its own link (htb burst {args.burst}; {LINKS[args.link]}), "
          + (f"shaped to {args.rate} x its CPU share / the 8-process layout's" if args.rate else
             f"its rate calibrated so that the plain step waits {args.share:.2f} of its time")
          + "; every setting run unshaped and shaped one after the other; times in s.\n"
          "loop: the micro-batches' forwards, backwards and exchanges; compute: the loop on the unshaped "
          "loopback; link: one step's all-to-alls replayed back to back on the shaped loopback with no compute; "
          "exposed: loop - compute; best: max(compute, link), the loop if every exchange hid under compute "
          "or the link never idled")
    for name in _chosen(args):
        print(f"\n{name}, {micro_batches(name, args)} micro-batches per rank, links at {rates[name]}")
        print("  rank  overlap       step    loop    compute  link    exposed  best    loop/plain  exposed/plain  best/plain")
        plain = results[name, "shaped", "none"]
        # overlap on / off per rank, per setting with overlap on
        ratios = {s: {"step": [], "loop": [], "exposed": []} for s in _settings(args) if s != "none"}
        for overlap in _settings(args):
            for rank, got in enumerate(results[name, "shaped", overlap]):
                c = results[name, "unshaped", overlap][rank]["loop"]
                c_plain = results[name, "unshaped", "none"][rank]["loop"]
                link, base = plain[rank]["comm"], plain[rank]["loop"]
                exposed, best = got["loop"] - c, max(c, link)
                on_off = {"step": got["step"] / plain[rank]["step"], "loop": got["loop"] / base,
                          "exposed": exposed / (base - c_plain)}
                print(f"  {rank:4d}  {overlap:12s}  {got['step']:.3f}  {got['loop']:.3f}  {c:.3f}    {link:.3f}   "
                      f"{exposed:.3f}    {best:.3f}   {on_off['loop']:.2f}        "
                      f"{on_off['exposed']:.2f}           {best / base:.2f}")
                if overlap != "none":
                    for key, value in on_off.items():
                        ratios[overlap][key].append(value)
        waits = [(p["loop"] - u["loop"], p) for p, u in zip(plain, results[name, "unshaped", "none"])]
        print(f"  waiting on the all-to-all, mean share of the plain step: "
              f"{statistics.mean(w / p['step'] for w, p in waits):.2f} (of its loop: "
              f"{statistics.mean(w / p['loop'] for w, p in waits):.2f})")
        for setting, by_key in ratios.items():
            print(f"  {setting} / none, range over the ranks: " + ", ".join(
                f"{key} {min(r):.2f}-{max(r):.2f}" for key, r in by_key.items()))
        unshaped = max(r["loop"] for r in results[name, "unshaped", "none"])
        link_s = max(r["comm"] for r in plain)
        planned = planned_loops(LAYOUTS[name], unshaped, rate_bytes(rates[name]), link_s, micro_batches(name, args))
        for (link, overlap), planned_s in planned.items():
            measured = max(r["loop"] for r in results[name, "shaped", overlap])
            print(f"  plan (as built, compute calibrated, link at the {link} rate) overlap={overlap}: "
                  f"{planned_s:.3f} s, measured slowest rank {measured:.3f} s, plan/measured {planned_s / measured:.2f}")
        # The plan's model of the pairs (parallel/plan/exposed_time.py): what it leaves exposed here.
        print("  plan's exposed on / off: " + ", ".join(
            f"{(planned[link, 'ep'] - unshaped) / (planned[link, 'none'] - unshaped):.2f} at the {link} rate"
            for link in ("shaped", "replayed")))
        if args.waits:
            from overlap_probes import report_waits

            report_waits({setting: (results[name, "unshaped", setting], results[name, "shaped", setting])
                          for setting in _settings(args)})


def _settings(args) -> tuple[str, ...]:
    return ("none", "ep", "ep-wgrad-now") if args.wgrad else ("none", "ep")


def _chosen(args) -> dict[str, tuple[int, int, int, int]]:
    return {name: layout for name, layout in LAYOUTS.items() if args.only in name}


def outside(args) -> None:
    """Create the shaped cluster, run this script inside its namespace, and remove the cluster
    whatever happens."""
    from shaped_cluster import NAMESPACE, ShapedCluster

    cluster = ShapedCluster(args.link == "fair")
    # SIGTERM becomes an exception, so the finally below removes the cluster then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        cluster.create()
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "tests"), os.environ.get("PYTHONPATH", "")]))
        subprocess.run(["ip", "netns", "exec", NAMESPACE, sys.executable, __file__, "--inside",
                        *(["--rate", args.rate] if args.rate else []), "--share", str(args.share),
                        "--burst", args.burst, "--steps", str(args.steps), "--micro", str(args.micro), "--repeats", str(args.repeats),
                        "--only", args.only, "--link", args.link, *(["--wgrad"] if args.wgrad else []),
                        *(["--waits"] if args.waits else [])],
                       check=True, env=env)
    finally:
        cluster.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", help="link rate of every rank of the 8-process layout (others scaled by their CPU "
                        "share); by default each layout's rate is calibrated to --share")
    parser.add_argument("--share", type=float, default=0.45,
                        help="calibrated links: the share of the plain step spent waiting on the all-to-all")
    # Just above the loopback's 64 KiB packets: a larger bucket refills during compute and lets each
    # exchange's first bytes through at once, hiding part of the link time from the plain run.
    parser.add_argument("--burst", default="80kb", help="htb burst of every rank's link")
    parser.add_argument("--link", choices=("fifo", "fair"), default="fifo",
                        help="how a rank's link serves its connections: one queue in order, or each its share in turn")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro", type=int, default=0,
                        help=f"micro-batches per rank and step of every layout (default: {MICRO}, and "
                        + ", ".join(f"{name}: {micro}" for name, micro in LAYOUT_MICRO.items()) + ")")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating off and on")
    parser.add_argument("--only", default="", help="run only the layouts whose name contains this")
    parser.add_argument("--waits", action="store_true",
                        help="also time where every rank waits: each kind of exchange, and pipeline inputs")
    parser.add_argument("--wgrad", action="store_true",
                        help="also run overlap with the experts' weight gradients in place (parallel.delay_wgrad=false)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.rate:
            rate_bytes(args.rate)
    except ValueError as error:
        parser.error(str(error))
    if not 0.05 <= args.share <= 0.8:
        parser.error(f"--share {args.share}: expected a share of the plain step between 0.05 and 0.8.")
    if args.inside:
        inside(args)
    else:
        outside(args)


if __name__ == "__main__":
    main()

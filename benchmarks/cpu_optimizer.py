"""The ZeRO-1 MuonClip step with whole-matrix ownership against two peers, on 4 data-parallel ranks.

Not a test: `make bench-optimizer` prints numbers for comparisons across commits. One invocation,
one gloo process group of 4 ranks (DP 4): every rank holds a replica of the same matrices (the Muon
matrices of a K2-shaped model at reduced width, each routed expert its own matrix) and its own
gradients, the same for every method. Per step, the methods take turns (the order rotates):

- ours: `parallel.zero1.optimizer.ShardGroup` (reduce_scatter to owners, Newton-Schulz once per matrix on
  its owner, all_gather; docs/ARCHITECTURE.md#zero-1);
- moonlight: Distributed Muon (Moonlight, arXiv 2502.16982, §2.3, Algorithm 1), the anchor
  to beat (docs/ARCHITECTURE.md#zero-1): ZeRO-1 over a flat buffer cut into equal slices that ignore matrix boundaries; after
  the reduce_scatter and the momentum update on its slice, a rank gathers from the other holders
  the pieces of every matrix its slice touches, runs Newton-Schulz on the whole matrix, keeps its
  part of the update; then all_gather. A matrix spanning k slices is orthogonalised k times;
- deepspeed: DeepSpeed's Muon under ZeRO stage 1 (a real peer), with K2's update scale matched
  through per-shape learning rates (see `DeepSpeedMuon`).

Step time: from a barrier to the end of the rank's step (DeepSpeed: `backward` + `step`, since
its ZeRO-1 reduces and orthogonalises in the backward epilogue), median over the timed steps;
"group" is the median over steps of the slowest rank. Bytes: `CollectiveMeter` counts what each
rank sends on every torch.distributed call, collectives under a ring model, sends exactly.
The 4 processes run one thread each on however many cores the machine has: on a 2-core machine
they time-share, so compare ratios, not absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from k2train.config.schema import ModelConfig, OptimizerConfig
from k2train.optim.muon_clip import split_param_groups
from parallel.zero1.ownership import newton_schulz_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from benchmarks.cpu_optimizer_methods import DistributedMuon, OwnershipMuon, deepspeed_methods  # noqa: E402
from benchmarks.cpu_optimizer_report import print_checks, print_header, print_table  # noqa: E402

WORLD = 4


def bench_model(hidden: int, layers: int, experts: int) -> ModelConfig:
    """K2's shape at reduced width: MLA with low-rank q/kv and K2's head dims halved, a dense first
    layer, then MoE layers with one shared expert and experts about hidden/3 wide (K2: 2048 of 7168;
    a multiple of 8, as grouped_mm needs). Wide enough that Newton-Schulz outweighs the copies and
    collectives of the step on a CPU."""
    return ModelConfig(
        vocab_size=1024, hidden_size=hidden, num_layers=layers, first_dense_layers=1,
        dense_intermediate_size=hidden * 8 // 3, moe_intermediate_size=hidden // 24 * 8, num_experts=experts,
        experts_per_token=2, num_heads=hidden // 64, q_lora_rank=hidden // 3, kv_lora_rank=hidden // 6,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    )


def bench_matrices(cfg: ModelConfig) -> list[tuple[str, Tensor]]:
    """(name, [n, m] float32) of every Muon matrix of the model, initialised as K2Model does; a 3-D
    expert stack [E, n, m] becomes E matrices `name[e]` (each expert is its own matrix, docs/ARCHITECTURE.md#zero-1)."""
    from k2train.model import K2Model

    muon_named, _ = split_param_groups(K2Model(cfg).named_parameters())
    named = []
    for name, param in muon_named:
        stack = param.detach().reshape(-1, *param.shape[-2:])
        suffixes = [f"[{e}]" for e in range(stack.shape[0])] if param.ndim == 3 else [""]
        named += [(name + suffix, matrix.clone()) for suffix, matrix in zip(suffixes, stack)]
    return named


def rank_gradients(shapes: list[torch.Size], rank: int, step: int) -> list[Tensor]:
    """This rank's gradients at `step`: N(0, 1e-2), seeded by (rank, step), one per matrix."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(shape, generator=generator) * 1e-2 for shape in shapes]


# -- bytes on the wire ----------------------------------------------------------------------------


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# Bytes one rank sends per call: (the argument whose bytes count, bytes sent per byte of it for a
# group of G). Ring algorithms; reduce and broadcast spread evenly over the ranks; a batch of
# point-to-point ops counts its isends exactly (`bytes_sent`).
_RING = {
    "all_reduce": ("tensor", lambda g: 2 * (g - 1) / g),
    "reduce": ("tensor", lambda g: (g - 1) / g * (1 + 1 / g)),
    "broadcast": ("tensor", lambda g: (g - 1) / g),
    "all_gather": ("tensor", lambda g: g - 1),
    "all_gather_into_tensor": ("input_tensor", lambda g: g - 1),
    "all_gather_single": ("input_tensor", lambda g: g - 1),
    "_all_gather_base": ("input_tensor", lambda g: g - 1),
    "reduce_scatter": ("output", lambda g: g - 1),
    "reduce_scatter_tensor": ("output", lambda g: g - 1),
    "reduce_scatter_single": ("output", lambda g: g - 1),
    "_reduce_scatter_base": ("output", lambda g: g - 1),
    "all_to_all_single": ("input", lambda g: (g - 1) / g),
    "send": ("tensor", lambda g: 1),
}
COUNTED = (*_RING, "batch_isend_irecv")


def bytes_sent(name: str, arguments: dict) -> float:
    if name == "batch_isend_irecv":
        return sum(_nbytes(op.tensor) for op in arguments["p2p_op_list"] if op.op.__name__ == "isend")
    key, per_byte = _RING[name]
    return per_byte(dist.get_world_size(arguments["group"])) * _nbytes(arguments[key])


class CollectiveMeter:
    """Bytes and calls of torch.distributed collectives, per method, while `method` is set.

    Installed before anything keeps a reference to a collective (parallel.zero1.optimizer binds its
    reduce_scatter at import, DeepSpeed its all_gather when it initialises), it wraps every function
    of `COUNTED` in torch.distributed and its c10d module. A collective implemented by another
    counts once (only the outermost call).
    """

    def __init__(self):
        self.method: str | None = None
        self.sent: dict[str, float] = Counter()
        self.calls: dict[str, Counter] = {}
        self._depth = 0
        self._originals: list[tuple[object, str, object]] = []

    def install(self) -> None:
        c10d = dist.distributed_c10d
        for name in COUNTED:
            original = getattr(c10d, name, None)
            if original is None:
                continue
            counted = self._counting(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self._originals.append((module, name, original))
                    setattr(module, name, counted)

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _counting(self, name, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.method is not None and self._depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self.sent[self.method] += bytes_sent(name, bound.arguments)
                self.calls.setdefault(self.method, Counter())[name] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


# -- one rank's run -------------------------------------------------------------------------------


def run_steps(methods: dict, reference: OwnershipMuon, shapes: list[torch.Size], meter: CollectiveMeter,
              args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Warm-up and timed steps, the methods taking turns in a rotating order; per timed step the
    wall time and this process's CPU time (all its threads, gloo's included)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for step in range(args.warmup + args.steps):
        grads = rank_gradients(shapes, dist.get_rank(), step)
        timed = step >= args.warmup
        names = list(methods)
        for name in names[step % len(names):] + names[:step % len(names)]:
            methods[name].prepare(grads)
            dist.barrier()
            meter.method = name if timed else None
            start, cpu_start = time.perf_counter(), time.process_time()
            methods[name].step()
            elapsed = (time.perf_counter() - start, time.process_time() - cpu_start)
            meter.method = None
            if timed:
                times[name].append(elapsed)
        reference.prepare(grads)
        reference.step()
    return times


def run_rank(args: argparse.Namespace) -> dict | None:
    """Build the optimizers on this rank, run them, return what rank 0 prints (None elsewhere)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    size = dist.get_world_size()
    meter = CollectiveMeter()
    meter.install()
    model_cfg = bench_model(args.hidden, args.layers, args.experts)
    named = bench_matrices(model_cfg)
    cfg = OptimizerConfig(lr=args.lr, ns_dtype=args.ns_dtype)
    ours = OwnershipMuon(named, cfg, size)
    methods = {"ours": ours, "moonlight": DistributedMuon(named, cfg, size)}
    notes = {}
    if args.deepspeed:
        deepspeed, notes = deepspeed_methods(named, cfg, args)
        methods.update(deepspeed)
    other = "bfloat16" if args.ns_dtype == "float32" else "float32"
    reference = OwnershipMuon(named, OptimizerConfig(lr=args.lr, ns_dtype=other), size)
    times = run_steps(methods, reference, [m.shape for _, m in named], meter, args)
    meter.uninstall()
    result = dict(
        times=times, sent={name: meter.sent[name] / args.steps for name in methods},
        calls={name: {k: v // args.steps for k, v in meter.calls.get(name, {}).items()} for name in methods},
        ns={name: [newton_schulz_flops(n, m, cfg.ns_steps) for n, m in method.ns_matrices()]
            for name, method in methods.items()},
        ours_expected_bytes=2 * (size - 1) * ours.group.region * 4,
    )
    results = [None] * size if dist.get_rank() == 0 else None
    dist.gather_object(result, results, dst=0)
    finals = {name: method.matrices() for name, method in methods.items()} | {"reference": reference.matrices()}
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return dict(results=results, finals=finals, initial=[m for _, m in named], notes=notes, other=other,
                model=model_cfg, size=size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3, help="the first dense, the rest MoE")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="ours and moonlight; float32 makes their equality check exact up to summation order")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    parser.add_argument("--ds-ns-method", default="gram", choices=["gram", "standard"])
    parser.add_argument("--ds-compile", action="store_true",
                        help="let DeepSpeed torch.compile its muon_update (slow first step on CPU)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:  # not under torchrun yet: start the DP group of WORLD ranks
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(WORLD), __file__, *sys.argv[1:]]
        sys.exit(subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode)
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = run_rank(args)
    if out is not None:
        print_header(out, args)
        print_table(out)
        print_checks(out, args)


if __name__ == "__main__":
    main()

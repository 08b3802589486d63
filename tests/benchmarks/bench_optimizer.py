"""The ZeRO-1 MuonClip step with whole-matrix ownership against two peers, on 4 data-parallel ranks.

Not a test: `make bench-optimizer` prints numbers for comparisons across commits. One invocation,
one gloo process group of 4 ranks (DP 4): every rank holds a replica of the same matrices (the Muon
matrices of a K2-shaped model at reduced width, each routed expert its own matrix) and its own
gradients, the same for every method. Per step, the methods take turns (the order rotates):

- ours: `parallel.zero1.optimizer.ShardGroup` (reduce_scatter to owners, Newton-Schulz once per matrix on
  its owner, all_gather; DESIGN §3);
- moonlight: Distributed Muon (Moonlight, arXiv 2502.16982, §2.3, Algorithm 1), the anchor DESIGN
  §3 names: ZeRO-1 over a flat buffer cut into equal slices that ignore matrix boundaries; after
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
import contextlib
import functools
import inspect
import io
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2train.config.schema import ModelConfig, OptimizerConfig
from k2train.optim.muon_clip import muon_momentum_, split_param_groups
from k2train.optim.newton_schulz import newton_schulz_many
from parallel.zero1.ownership import newton_schulz_flops

WORLD = 4
METHODS = ("ours", "moonlight", "deepspeed", "ds-k2scale")


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
    expert stack [E, n, m] becomes E matrices `name[e]` (each expert is its own matrix, K2_REFERENCE §2)."""
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


# -- the three optimizers -------------------------------------------------------------------------


class OwnershipMuon:
    """Ours: one `ShardGroup` over the DP group; each matrix owned whole by one rank."""

    def __init__(self, named: list[tuple[str, Tensor]], cfg: OptimizerConfig, divisor: float):
        from parallel.zero1.optimizer import ShardGroup  # after the meter is installed: zero1 binds reduce_scatter

        self.params = [nn.Parameter(matrix.clone()) for _, matrix in named]
        self.group = ShardGroup([(n, p) for (n, _), p in zip(named, self.params)], 0, dist.group.WORLD, cfg)
        self.cfg, self.divisor = cfg, divisor
        self.grads: list[Tensor] = []

    def prepare(self, grads: list[Tensor]) -> None:
        self.grads = grads

    def step(self) -> None:
        for param, grad in zip(self.params, self.grads):
            param.grad = grad
        self.group.accumulate_leftovers()  # .grad into the float32 flat buffer, as backward's hooks do
        self.group.reduce(self.divisor)
        self.group.update(self.cfg.lr, clip_coef=1.0)
        self.group.gather()

    def ns_matrices(self) -> list[tuple[int, int]]:
        return [s.item.shape for s in self.group.owned if s.item.muon]

    def matrices(self) -> list[Tensor]:
        return [param.detach() for param in self.params]


class DistributedMuon:
    """Moonlight's Distributed Muon (arXiv 2502.16982, §2.3, Algorithm 1) with K2's Muon rules.

    The flat buffer of all matrices (in model order) is cut into G equal slices of S elements;
    rank r keeps the float32 master and momentum of [r·S, (r+1)·S). Per step: reduce_scatter the
    gradients; M = μ·M + G and the Nesterov input μ·M + G on the slice (elementwise, so slicing is
    exact); for every matrix the slice touches, the holders exchange their pieces of that input
    (one point-to-point batch) so each has the whole matrix, run Newton-Schulz on it (same shapes
    batched, as ours), and apply their part of the update; all_gather the new parameters.
    """

    def __init__(self, named: list[tuple[str, Tensor]], cfg: OptimizerConfig, divisor: float):
        self.cfg, self.divisor = cfg, divisor
        self.grads_in: list[Tensor] = []
        self.size, self.rank = dist.get_world_size(), dist.get_rank()
        self.params = [matrix.clone() for _, matrix in named]
        self.spans, start = [], 0
        for param in self.params:
            self.spans.append((start, start + param.numel()))
            start += param.numel()
        self.slice = -(-start // self.size)
        self.lo, self.hi = self.rank * self.slice, (self.rank + 1) * self.slice
        self.grads = torch.zeros(self.size * self.slice)
        self.grad_slice = torch.zeros(self.slice)
        self.momentum = torch.zeros(self.slice)
        flat = torch.cat([p.reshape(-1) for p in self.params] + [torch.zeros(self.size * self.slice - start)])
        self.master = flat[self.lo:self.hi].clone()
        self.held = [i for i, (s, e) in enumerate(self.spans) if s < self.hi and e > self.lo]

    def holders(self, i: int) -> range:
        s, e = self.spans[i]
        return range(s // self.slice, (e - 1) // self.slice + 1)

    def _piece(self, i: int, rank: int) -> tuple[int, int]:
        """The part of matrix i in rank's slice, as offsets within the matrix."""
        s, e = self.spans[i]
        return max(s, rank * self.slice) - s, min(e, (rank + 1) * self.slice) - s

    def _full_matrices(self, ns_input: Tensor) -> list[Tensor]:
        """Every held matrix's whole Newton-Schulz input: my piece, the others' pieces received."""
        ops, fulls = [], []
        for i in self.held:
            s, _ = self.spans[i]
            full = torch.empty(self.params[i].numel())
            a, b = self._piece(i, self.rank)
            mine = ns_input[s + a - self.lo:s + b - self.lo]
            full[a:b].copy_(mine)
            for holder in self.holders(i):
                if holder != self.rank:
                    pa, pb = self._piece(i, holder)
                    ops.append(dist.P2POp(dist.irecv, full[pa:pb], holder))
                    ops.append(dist.P2POp(dist.isend, mine, holder))
            fulls.append(full.view(self.params[i].shape))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return fulls

    def prepare(self, grads: list[Tensor]) -> None:
        self.grads_in = grads

    def step(self) -> None:
        cfg, lr = self.cfg, self.cfg.lr
        for (s, e), grad in zip(self.spans, self.grads_in):
            self.grads[s:e].copy_(grad.reshape(-1))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(self.grad_slice, self.grads, op=dist.ReduceOp.SUM)
        self.grad_slice.div_(self.divisor)
        ns_input = muon_momentum_(self.grad_slice, self.momentum, cfg.muon_momentum, cfg.nesterov)
        fulls = self._full_matrices(ns_input)
        orthogonal = newton_schulz_many(fulls, cfg.ns_steps, cfg.ns_coefficients, getattr(torch, cfg.ns_dtype))
        for i, update in zip(self.held, orthogonal):
            s, _ = self.spans[i]
            a, b = self._piece(i, self.rank)
            # The same operations as apply_muon_update_, on this rank's part of the matrix.
            scale = cfg.update_rms * math.sqrt(max(self.params[i].shape))
            master = self.master[s + a - self.lo:s + b - self.lo]
            master.mul_(1 - lr * cfg.weight_decay)
            master.add_(update.reshape(-1)[a:b], alpha=-lr * scale)
        gathered = torch.empty(self.size * self.slice)
        dist.all_gather_into_tensor(gathered, self.master)
        for (s, e), param in zip(self.spans, self.params):
            param.copy_(gathered[s:e].view(param.shape))

    def ns_matrices(self) -> list[tuple[int, int]]:
        return [tuple(self.params[i].shape) for i in self.held]

    def matrices(self) -> list[Tensor]:
        return self.params


class _GradientProbe(nn.Module):
    """The matrices, with loss sum_i <W_i, G_i>: its gradient is exactly G_i, so DeepSpeed's engine
    receives the given gradients through its own backward and reduction."""

    def __init__(self, matrices: list[Tensor]):
        super().__init__()
        self.mats = nn.ParameterList([nn.Parameter(matrix.clone()) for matrix in matrices])

    def forward(self, grads: list[Tensor]) -> Tensor:
        return sum((param * grad).sum() for param, grad in zip(self.mats, grads))


class DeepSpeedMuon:
    """DeepSpeed's Muon under ZeRO stage 1, set as close to K2's Muon as its options allow.

    Matched: momentum 0.95 with Nesterov (DeepSpeed keeps M as an EMA, (1-μ) times K2's M, a scale
    Newton-Schulz normalises away), 5 steps, K2's coefficients (hard-coded there), decoupled decay
    before the update. Its update scale is sqrt(max(1, n/m)), not 0.2·sqrt(max(n, m)), and no
    option changes it. With `k2_scale` each shape gets its own param group with
    lr_g = lr·0.2·sqrt(max(n, m))/sqrt(max(1, n/m)) and decay λ·lr/lr_g, which gives K2's update;
    but ZeRO partitions every param group on its own, so more matrices straddle partitions than with
    the single group DeepSpeed would use (`k2_scale` False: its own scale, its natural layout).
    Its Newton-Schulz: "gram" (its default: fp16 where the accelerator has fp16 GEMMs, else float32;
    equal to the standard iteration in exact arithmetic) or "standard" (bf16). Its ZeRO-1 reduces
    the gradients with all_reduce (its default bucket all-reduce) and orthogonalises every matrix a
    partition touches, whole, on each such rank (Moonlight's scheme).
    """

    def __init__(self, named: list[tuple[str, Tensor]], cfg: OptimizerConfig, ns_method: str, k2_scale: bool):
        import deepspeed
        from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

        self.module = _GradientProbe([matrix for _, matrix in named])
        groups = [{"params": list(self.module.mats)}]
        if k2_scale:
            by_shape: dict[tuple[int, int], list[nn.Parameter]] = {}
            for param in self.module.mats:
                by_shape.setdefault(tuple(param.shape), []).append(param)
            groups = []
            for (n, m), params in by_shape.items():
                group_lr = cfg.lr * cfg.update_rms * math.sqrt(max(n, m)) / math.sqrt(max(1.0, n / m))
                groups.append({"params": params, "lr": group_lr, "weight_decay": cfg.weight_decay * cfg.lr / group_lr})
        config = {
            "train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "optimizer": {"type": "Muon", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                     "momentum": cfg.muon_momentum, "ns_method": ns_method,
                                                     "torch_adam": True}},
            "zero_optimization": {"stage": 1},
        }
        with contextlib.redirect_stdout(io.StringIO()):  # its op-build and config chatter
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.module, model_parameters=groups, config=config)
        self.ns_dtype = str(ns_compute_dtype(ns_method)).removeprefix("torch.")
        self.loss: Tensor | None = None

    def prepare(self, grads: list[Tensor]) -> None:
        self.loss = self.engine(grads)

    def step(self) -> None:
        self.engine.backward(self.loss)
        self.engine.step()

    def ns_matrices(self) -> list[tuple[int, int]]:
        return [tuple(p.shape) for group in self.optimizer.params_in_partition for p in group]

    def matrices(self) -> list[Tensor]:
        return [param.detach() for param in self.module.mats]


def deepspeed_methods(named: list[tuple[str, Tensor]], cfg: OptimizerConfig,
                      args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """DeepSpeed in both settings and the report's notes on them (why it did not run, if it did not)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        if not args.ds_compile:
            # Its muon_update is torch.compile'd; inductor on CPU takes tens of seconds per new shape set.
            torch._dynamo.config.disable = True
        methods = {"deepspeed": DeepSpeedMuon(named, cfg, args.ds_ns_method, k2_scale=False),
                   "ds-k2scale": DeepSpeedMuon(named, cfg, args.ds_ns_method, k2_scale=True)}
    except Exception as error:  # a missing or broken DeepSpeed is reported, and the rest still runs
        return {}, {"deepspeed": f"not run: {type(error).__name__}: {str(error).splitlines()[0]}"}
    how = (f"DeepSpeed {deepspeed.__version__} Muon, ZeRO stage 1, ns_method {args.ds_ns_method} (computes in "
           f"{methods['deepspeed'].ns_dtype} here), {'torch.compile' if args.ds_compile else 'eager'}")
    return methods, {"deepspeed": f"{how}; one param group, its own update scale sqrt(max(1, n/m))·O",
                     "ds-k2scale": "the same with a param group per shape, lr and decay set to make the update "
                                   "K2's 0.2·sqrt(max(n, m))·O"}


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


# -- the report -----------------------------------------------------------------------------------


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

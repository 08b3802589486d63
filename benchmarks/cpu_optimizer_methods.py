"""The three ZeRO-1 Muon steps `benchmarks/cpu_optimizer.py` compares, each behind the same
`prepare(grads)` / `step()` / `ns_matrices()` / `matrices()`: ours (`ShardGroup`, whole-matrix
ownership), Moonlight's Distributed Muon (flat equal slices, Newton-Schulz repeated on every holder)
and DeepSpeed's Muon under ZeRO stage 1 (a real peer, in two settings). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2train.config.schema import OptimizerConfig
from k2train.optim.muon_clip import muon_momentum_
from k2train.optim.newton_schulz import newton_schulz_many


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

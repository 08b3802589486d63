"""The sections of `benchmarks/gpu_kernels.py`: each measures one thing on the GPU, checks it
against its reference there, and returns its numbers with the table rows they make.

Throughputs count the work of the plain algorithm: bytes read + written for copies and FP8 tiles,
multiply-adds × 2 for GEMMs, the unskipped FLOPs for Newton–Schulz (docs/ARCHITECTURE.md#h200-limits counts the same
way, so the figures compare with it). Times are medians of CUDA-event intervals after warm-up.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sizes:
    """K2 shapes (K2 §2.3: 384 experts / EP 16 = 24 local experts; hidden 7168; width 2048)."""

    gemm: int = 8192
    copy_bytes: int = 2**30
    attention: tuple[int, int, int, int, int] = (1, 64, 4096, 192, 128)  # B, H, S, qk dim, v dim
    fp8: tuple[int, int] = (16384, 7168)
    newton_schulz: tuple[int, int, int] = (24, 2048, 7168)
    experts: tuple[int, int, int, int] = (24, 1365, 7168, 2048)  # local experts, mean rows, D, I
    moe_tokens: int = 4096  # routed top-8 over the 24 experts: ~1365 rows each, as above
    top_k: int = 8
    warmup: int = 3
    iters: int = 10

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(gemm=256, copy_bytes=2**20, attention=(1, 2, 64, 24, 16), fp8=(64, 300),
                   newton_schulz=(3, 32, 48), experts=(4, 20, 64, 32), moe_tokens=32, top_k=2, warmup=1, iters=2)


class Bench:
    """The device, the sizes, the card's measured limits (set by the first two sections) and a timer."""

    def __init__(self, device: torch.device, sizes: Sizes):
        self.device, self.sizes = device, sizes
        self.gemm_tflops: float | None = None
        self.copy_gbs: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], iters: int | None = None) -> float:
        """Median milliseconds of fn() over `iters` runs, after `warmup` runs."""
        for _ in range(self.sizes.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters or self.sizes.iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def randn(self, *shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=dtype, requires_grad=grad)


def _row(name: str, unit: str, measured: float, baseline: float | None = None, ratio: float | None = None,
         target: str | None = None, passed: bool | None = None) -> dict:
    return dict(name=name, unit=unit, measured=measured, baseline=baseline, ratio=ratio, target=target, **{"pass": passed})


def _vs_limit(name: str, unit: str, measured: float, baseline: float, limit: tuple[str, float | None],
              target: float) -> dict:
    """A throughput row judged as a fraction of the card's measured (label, value) limit; no verdict
    when that limit was not measured in this run."""
    label, value = limit
    ratio = measured / value if value else None
    return _row(name, unit, measured, baseline, ratio, f">= {target:.2f} x {label}", None if ratio is None else ratio >= target)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- the card's limits


def gemm_peak(b: Bench) -> dict:
    n = b.sizes.gemm
    x, y = b.randn(n, n), b.randn(n, n)
    out = torch.empty_like(x)
    ms = b.time_ms(lambda: torch.mm(x, y, out=out), iters=max(b.sizes.iters, 20))
    b.gemm_tflops = 2 * n**3 / ms / 1e9
    return dict(shape=[n, n, n], ms=ms, tflops=b.gemm_tflops, rows=[_row(f"bf16 GEMM {n}^3", "TFLOP/s", b.gemm_tflops)])


def copy_bandwidth(b: Bench) -> dict:
    src = torch.ones(b.sizes.copy_bytes // 2, device=b.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = b.time_ms(lambda: dst.copy_(src), iters=max(b.sizes.iters, 20))
    b.copy_gbs = 2 * src.nbytes / ms / 1e6
    return dict(bytes=src.nbytes, ms=ms, gbs=b.copy_gbs, rows=[_row("device copy (read + write)", "GB/s", b.copy_gbs)])


# ---------------------------------------------------------------- attention with max logits


def _max_logits_reference(q: torch.Tensor, k: torch.Tensor, scale: float, heads_per_chunk: int = 8) -> torch.Tensor:
    """Per-head max of causal q·k·scale in FP32, a few heads at a time (the [S, S] logits are large)."""
    S = q.shape[-2]
    hidden = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    maxima = []
    for h in range(0, q.shape[1], heads_per_chunk):
        logits = (q[:, h:h + heads_per_chunk].float() @ k[:, h:h + heads_per_chunk].float().mT) * scale
        maxima.append(logits.masked_fill(hidden, float("-inf")).amax(dim=(0, 2, 3)))
    return torch.cat(maxima)


def attention(b: Bench) -> dict:
    from k2train.kernels.flash_attention import flash_attention_with_max_logits

    B, H, S, DK, DV = b.sizes.attention
    q, k, v = b.randn(B, H, S, DK, grad=True), b.randn(B, H, S, DK, grad=True), b.randn(B, H, S, DV, grad=True)
    grad_out = b.randn(B, H, S, DV)
    scale = DK**-0.5

    def ours():
        return flash_attention_with_max_logits(q, k, v, scale)[0]

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def fwd_bwd(fn):
        q.grad = k.grad = v.grad = None
        fn().backward(grad_out)

    out, max_logits = flash_attention_with_max_logits(q, k, v, scale)
    checks = dict(out_rel_error_vs_sdpa=_rel(out, sdpa()),
                  max_logit_rel_error=_rel(max_logits, _max_logits_reference(q.detach(), k.detach(), scale)))
    ms = {"ours_fwd_bwd": b.time_ms(lambda: fwd_bwd(ours)), "sdpa_fwd_bwd": b.time_ms(lambda: fwd_bwd(sdpa))}
    with torch.no_grad():
        ms.update(ours_fwd=b.time_ms(ours), sdpa_fwd=b.time_ms(sdpa))
    fwd_flops = 2 * B * H * S * S / 2 * (DK + DV)  # causal: half of QKᵀ and of PV
    tflops = {key: (fwd_flops * (1 if key.endswith("_fwd") else 3.5)) / t / 1e9 for key, t in ms.items()}
    ratio = ms["ours_fwd_bwd"] / ms["sdpa_fwd_bwd"]
    row = _row("attention fwd+bwd + max logits (vs SDPA)", "ms", ms["ours_fwd_bwd"], ms["sdpa_fwd_bwd"], ratio,
               "<= 1.10 x SDPA time", ratio <= 1.10)
    return dict(shape=dict(B=B, H=H, S=S, qk=DK, v=DV), ms=ms, tflops_counting_bwd_as_2_5x_fwd=tflops,
                checks=checks, rows=[row])


# ---------------------------------------------------------------- FP8 tiles


def _special_rows(device: torch.device) -> torch.Tensor:
    """Zero, -0, ±inf, NaN, NaN beside inf, huge, subnormal and ordinary tiles (as in tests/test_kernel_fp8.py)."""
    rows = torch.zeros(8, 256)
    rows[1] = -0.0
    rows[2, 5], rows[3, 7], rows[4, 9], rows[5, 0], rows[5, 1] = math.inf, -math.inf, math.nan, math.nan, math.inf
    rows[6] = torch.linspace(-3e38, 3e38, 256)
    rows[7] = torch.linspace(-1e-40, 1e-40, 256)
    return rows.to(device)


def _fp8_checks(x: torch.Tensor) -> dict:
    """The fused kernels against the eager reference, bit for bit (NaN bytes and NaN scales included)."""
    from k2train.memory.fp8 import dequantize_tiles_eager, quantize_tiles_eager, dequantize_tiles, quantize_tiles

    checks = {}
    for name, t in (("random", x), ("special_values", _special_rows(x.device))):
        fast, ref = quantize_tiles(t), quantize_tiles_eager(t, 128)
        checks[f"{name}_data_bits_equal"] = torch.equal(fast.data.view(torch.uint8), ref.data.view(torch.uint8))
        checks[f"{name}_scales_equal"] = bool(torch.isclose(fast.scales, ref.scales, 0, 0, equal_nan=True).all())
        back, back_ref = dequantize_tiles(ref), dequantize_tiles_eager(ref)
        checks[f"{name}_dequantized_equal"] = bool(torch.isclose(back, back_ref, 0, 0, equal_nan=True).all())
    return checks


def fp8_tiles(b: Bench) -> dict:
    from k2train.memory.fp8 import (dequantize_tiles_eager, fp8_kernels_serve, quantize_tiles_eager,
                                    dequantize_tiles, quantize_tiles)

    M, K = b.sizes.fp8
    x = b.randn(M, K)
    tiles = quantize_tiles(x)
    moved = x.nbytes + tiles.nbytes  # quantise reads x, writes data + scales; dequantise the reverse
    ms = dict(quantize=b.time_ms(lambda: quantize_tiles(x)), quantize_eager=b.time_ms(lambda: quantize_tiles_eager(x, 128)),
              dequantize=b.time_ms(lambda: dequantize_tiles(tiles)),
              dequantize_eager=b.time_ms(lambda: dequantize_tiles_eager(tiles)))
    gbs = {key: moved / t / 1e6 for key, t in ms.items()}
    rows = [_vs_limit(f"FP8 1x128 {op} {M}x{K} bf16", "GB/s", gbs[op], gbs[f"{op}_eager"], ("copy", b.copy_gbs), 0.85)
            for op in ("quantize", "dequantize")]
    return dict(shape=[M, K], fused_kernels=fp8_kernels_serve(x), bytes_moved=moved, ms=ms, gbs=gbs,
                checks=_fp8_checks(x), rows=rows)


# ---------------------------------------------------------------- Newton–Schulz

GRAM_CONFIGS = [dict(blocks=(128, 64), num_warps=8, num_stages=3), dict(blocks=(128, 64), num_warps=4, num_stages=4),
                dict(blocks=(128, 128), num_warps=8, num_stages=3), dict(blocks=(64, 64), num_warps=4, num_stages=4)]


def _gram_key(config: dict) -> str:
    return "gram_{}x{}_w{}_s{}".format(*config["blocks"], config["num_warps"], config["num_stages"])


def _gram_sweep(b: Bench, X: torch.Tensor) -> tuple[dict, dict]:
    """X·Xᵀ by cuBLAS and by the triangle kernel under a few tile configurations: (ms and errors,
    the fastest configuration)."""
    from k2train.kernels.newton_schulz import gram

    A = torch.empty(X.shape[0], X.shape[1], X.shape[1], device=X.device, dtype=X.dtype)
    result = {"cublas_bmm": b.time_ms(lambda: torch.bmm(X, X.mT, out=A))}
    reference = torch.bmm(X, X.mT)
    timed = {}
    for config in GRAM_CONFIGS:
        key = _gram_key(config)
        try:
            result[key] = timed[key] = b.time_ms(lambda: gram(X, out=A, **config))
            result[key + "_rel_error"] = _rel(gram(X, **config), reference)
        except Exception as error:  # a tile that does not fit this card's shared memory
            result[key] = f"{type(error).__name__}: {error}"
    best = min(GRAM_CONFIGS, key=lambda c: timed.get(_gram_key(c), math.inf))
    return result, best


def newton_schulz(b: Bench) -> dict:
    from k2train.kernels.newton_schulz import newton_schulz_fast
    from k2train.optim.newton_schulz import K2_NS_COEFFICIENTS as COEF
    from k2train.optim.newton_schulz import newton_schulz_eager
    from parallel.zero1.ownership import newton_schulz_flops

    E, n, m = b.sizes.newton_schulz
    G = b.randn(E, n, m)
    flops = E * newton_schulz_flops(n, m, 5)
    sweep, best = _gram_sweep(b, (G / G.float().norm(dim=(-2, -1), keepdim=True)).to(torch.bfloat16))
    runs = {"eager": lambda: newton_schulz_eager(G, 5, COEF, 1e-7, torch.bfloat16),
            "fast": lambda: newton_schulz_fast(G, 5, COEF),
            "symmetric": lambda: newton_schulz_fast(G, 5, COEF, symmetric=True),
            "symmetric_best_tiles": lambda: newton_schulz_fast(G, 5, COEF, symmetric=True, gram_options=best)}
    fp32 = newton_schulz_eager(G, 5, COEF, 1e-7, torch.float32)
    checks = {f"{key}_rel_error_vs_fp32_iteration": _rel(fn(), fp32) for key, fn in runs.items()}
    del fp32
    ms = {key: b.time_ms(fn, iters=max(3, b.sizes.iters // 2)) for key, fn in runs.items()}
    tflops = {key: flops / t / 1e9 for key, t in ms.items()}
    rows = [_vs_limit(f"Newton-Schulz 5 steps {E}x{n}x{m} ({key})", "TFLOP/s", tflops[key], tflops["eager"],
                      ("GEMM peak", b.gemm_tflops), 0.70) for key in ("fast", "symmetric", "symmetric_best_tiles")]
    return dict(shape=[E, n, m], plain_flops=flops, ms=ms, tflops=tflops, best_gram_tiles=best,
                gram_sweep_ms=sweep, checks=checks, rows=rows)


# ---------------------------------------------------------------- routed experts


def _uneven_counts(E: int, mean: int) -> list[int]:
    """E row counts around `mean` (±30%, fixed), summing to E·mean: routing is never even."""
    counts = [round(mean * (1 + 0.3 * math.sin(2.4 * e + 0.7))) for e in range(E)]
    counts[-1] += E * mean - sum(counts)
    return counts


def _sync_check(b: Bench, cfg) -> dict[str, str]:
    """Routed MoE (router, grouped experts, shared expert) forward + backward with CUDA's sync
    debugging set to raise, plain and with FP8 storage + recomputation: 'none' or the error."""
    from k2train.memory.policy import SavePolicy
    from k2train.model.moe import MoE

    if b.device.type != "cuda":
        return {"plain": "not checked (no CUDA)"}
    x = b.randn(1, b.sizes.moe_tokens, cfg.hidden_size, grad=True)
    result = {}
    for name, memory_features in (("plain", False), ("fp8_storage_and_recompute", True)):
        moe = MoE(cfg, policy=SavePolicy(fp8=memory_features, recompute=memory_features)).to(b.device, torch.bfloat16)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        moe(x)[0].float().square().mean().backward()  # compiles the kernels outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)[0].float().square().mean().backward()
            result[name] = "none"
        except RuntimeError as error:
            result[name] = f"{type(error).__name__}: {error}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result


def experts(b: Bench) -> dict:
    from k2train.config.schema import ModelConfig
    from k2train.memory.policy import SavePolicy
    from k2train.model.moe import Experts

    E, mean, D, I = b.sizes.experts
    cfg = ModelConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, experts_per_token=b.sizes.top_k)
    module = Experts(cfg).to(b.device, torch.bfloat16)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = _uneven_counts(E, mean)
    counts_E = torch.tensor(counts, device=b.device)
    x, grad_out = b.randn(sum(counts), D, grad=True), b.randn(sum(counts), D)

    def fwd_bwd(forward):
        module.zero_grad(set_to_none=True)
        x.grad = None
        forward(x, counts_E).backward(grad_out)

    checks = {"forward_rel_error_vs_loop": _rel(module(x, counts_E), module.forward_loop(x, counts_E)),
              "host_syncs_in_moe_forward_backward": _sync_check(b, cfg)}
    ms = {"grouped": b.time_ms(lambda: fwd_bwd(module)), "loop": b.time_ms(lambda: fwd_bwd(module.forward_loop))}
    # memory.fp8_activations: the up-projection and SwiGLU inputs as FP8 tiles (fwd_bwd reads `module` when called).
    fp8_module = Experts(cfg, policy=SavePolicy(fp8=True)).to(b.device, torch.bfloat16)
    fp8_module.load_state_dict(module.state_dict())
    module = fp8_module
    ms["grouped_fp8_storage"] = b.time_ms(lambda: fwd_bwd(module))
    flops = 18 * sum(counts) * D * I  # 3 GEMMs of 2·N·D·I forward, twice that backward
    tflops = {key: flops / t / 1e9 for key, t in ms.items()}
    rows = [_vs_limit(f"experts fwd+bwd {E}x~{mean} rows, {D}->{I}", "TFLOP/s", tflops["grouped"], tflops["loop"],
                      ("GEMM peak", b.gemm_tflops), 0.75),
            _row("  same, FP8 activation storage", "TFLOP/s", tflops["grouped_fp8_storage"], tflops["grouped"])]
    return dict(counts=counts, flops=flops, ms=ms, tflops=tflops, checks=checks, rows=rows)


SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "gemm": gemm_peak, "copy": copy_bandwidth, "attention": attention, "fp8": fp8_tiles,
    "newton_schulz": newton_schulz, "experts": experts,
}

"""One K2 MoE decoder layer on one GPU, each memory feature on and off (`make bench-device-memory`).

The layer is what one EP rank of `k2_1t` runs (K2 §2.3, §2.4): MLA on one 4096-token
sequence, the router over 384 experts, 24 local experts receiving ~1,365 rows each (the 4096 × 8
routed rows folded onto them, `k2train/memory/layer_probe.py`) and the shared expert, in bf16. For
each combination of FP8 storage, selective recomputation and activation offload it measures, with
CUDA events and the caching allocator's statistics:
- forward + backward time (median of the timed repetitions);
- device memory held between forward and backward (what waits for backward on the GPU);
- peak device memory of the forward + backward above the parameters and gradients;
- the saved bytes per token by place, counted by the saved-tensor hooks;
and checks on the GPU that recomputation and offload leave the gradients bit-identical and FP8
storage keeps them within a few percent. Writes a JSON report (--out) after every combination, so
a run cut short keeps what it measured. Not a test. Without CUDA it stops with one sentence
(--smoke runs a small layer on any device, to check the script itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # GPU images run it from a checkout

from k2train.config.load import load_config  # noqa: E402
from k2train.memory.layer_probe import moe_layer  # noqa: E402
from k2train.memory.offload import ActivationOffloader  # noqa: E402
from k2train.memory.policy import SavePolicy  # noqa: E402
from k2train.memory.saved import DEVICE, OFFLOADED, SavedActivations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMBINATIONS = {  # name: (fp8, recompute, offload)
    "none": (False, False, False),
    "fp8": (True, False, False),
    "recompute": (False, True, False),
    "offload": (False, False, True),
    "recompute + fp8": (True, True, False),
    "recompute + fp8 + offload": (True, True, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-memory-device.json", help="where the JSON report goes")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per combination")
    parser.add_argument("--smoke", action="store_true", help="a small layer on any device: checks the script")
    return parser.parse_args(argv)


def one_pass(model, x_BSD, offload: bool, device: torch.device) -> dict:
    """Forward + backward once; returns timings, memory and saved bytes (grads left on the params)."""
    offloader = ActivationOffloader(device) if offload else None
    saved = SavedActivations([model], offloader)
    if offloader is not None:
        offloader.expect(["mb"])
    model.zero_grad(set_to_none=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    before = _allocated(device)
    _reset_peak(device)
    start = time.perf_counter()
    with saved.record("mb", tokens=x_BSD.shape[0] * x_BSD.shape[1]):
        out = model(x_BSD).output
    out = saved.mark_backward_start(out, "mb")
    sync()
    held = _allocated(device) - before
    out.float().square().mean().backward()
    sync()
    seconds = time.perf_counter() - start
    saved.close()
    tokens = saved.bytes.tokens
    return dict(seconds=seconds, held_bytes=held, peak_bytes=_peak(device) - before,
                saved_device_per_token=saved.bytes.total(DEVICE) / tokens,
                saved_offloaded_per_token=saved.bytes.total(OFFLOADED) / tokens)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare(reference: dict, got: dict) -> dict:
    """Bit-equality and the largest relative gradient difference against the 'none' run."""
    worst = max(((got[n].float() - g.float()).norm() / g.float().norm().clamp(min=1e-30)).item()
                for n, g in reference.items())
    return dict(bit_identical=all(torch.equal(got[n], g) for n, g in reference.items()), max_rel_diff=worst)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench-device-memory: no CUDA device here; run it on a GPU machine (or --smoke to check the script).")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(ROOT / "configs" / "k2_1t.yaml").model
    tokens, local, dtype = 4096, 24, torch.bfloat16
    if args.smoke:
        cfg = dataclasses.replace(cfg, hidden_size=256, moe_intermediate_size=128, num_heads=4, q_lora_rank=64,
                                  kv_lora_rank=32, num_experts=48)
        tokens, dtype = 128, torch.float32
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, tokens=tokens, local_experts=local, routed_experts=cfg.num_experts,
                  rows_per_local_expert=tokens * cfg.experts_per_token / local, dtype=str(dtype), results={})
    started = time.perf_counter()
    x_BSD = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype,
                        generator=torch.Generator(device).manual_seed(0), requires_grad=False)
    reference = None
    for name, (fp8, recompute, offload) in COMBINATIONS.items():
        model = None  # the previous combination's layer leaves before the next one is built
        try:
            # fp8 and recompute are the layer's SavePolicy; the same seed gives every layer the same weights.
            model = moe_layer(cfg, local, policy=SavePolicy(fp8=fp8, recompute=recompute)).to(device=device, dtype=dtype)
            report["layer_parameters"] = sum(p.numel() for p in model.parameters())
            one_pass(model, x_BSD, offload, device)  # warm-up (and kernel autotuning)
            runs = [one_pass(model, x_BSD, offload, device) for _ in range(args.repeats)]
            result = {k: runs[-1][k] for k in runs[-1] if k != "seconds"}
            result["ms"] = 1e3 * statistics.median(r["seconds"] for r in runs)
            now = grads(model)
            if reference is None:
                # The run-to-run floor: index_add_ and the GEMMs may sum in a different order each
                # pass (atomics on the GPU, threads on a CPU), so two plain runs can differ too.
                reference = now
                one_pass(model, x_BSD, offload, device)
                report["run_to_run"] = compare(reference, grads(model))
            result["gradients_vs_none"] = compare(reference, now)
        except Exception as err:  # one combination failing must not lose the others' numbers
            result = dict(error=f"{type(err).__name__}: {err}")
        report["results"][name] = result
        report["elapsed_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    floor = report.get("run_to_run")
    if floor is not None:
        same = "none (bit-identical)" if floor["bit_identical"] else f"max rel diff {floor['max_rel_diff']:.2e}"
        print(f"  run-to-run difference of two plain passes: {same}")
    print(f"report: {args.out}")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['device']}: one k2_1t MoE layer on one EP rank, {report['tokens']} tokens, "
          f"{report['local_experts']} local experts x {report['rows_per_local_expert']:.0f} rows, {report['dtype']}")
    print(f"  {'features':<28}{'fwd+bwd ms':>11}{'held GiB':>10}{'peak GiB':>10}{'device B/tok':>14}"
          f"{'host B/tok':>12}  gradients vs none")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"  {name:<28}error: {r['error']}")
            continue
        g = r["gradients_vs_none"]
        verdict = "bit-identical" if g["bit_identical"] else f"max rel diff {g['max_rel_diff']:.2e}"
        print(f"  {name:<28}{r['ms']:>11.1f}{r['held_bytes'] / 2**30:>10.2f}{r['peak_bytes'] / 2**30:>10.2f}"
              f"{r['saved_device_per_token']:>14,.0f}{r['saved_offloaded_per_token']:>12,.0f}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())

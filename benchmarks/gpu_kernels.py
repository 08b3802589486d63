"""The GPU fast paths against their torch baselines, on one GPU, in one run (`make bench-device`).

First the card's own limits, measured here rather than taken from a datasheet: the bf16 GEMM peak
(8192³ matmul) and the device memory-copy bandwidth (read + write). Then each fast path beside its
torch baseline at K2 shapes (K2 §2.3; docs/ARCHITECTURE.md#h200-limits), with the issue's targets:
- attention forward + backward with per-head max logits vs SDPA without them (B 1, H 64, S 4096,
  qk 192, v 128, causal, bf16): at most 10% slower;
- FP8 1×128 quantise and dequantise of a 16384 × 7168 bf16 activation vs eager: >= 85% of the copy
  bandwidth, counting the bytes each reads and writes;
- Newton–Schulz, 5 steps on 24 × 2048×7168 bf16 vs eager: >= 70% of the GEMM peak, counting the
  FLOPs of the plain algorithm (the symmetric variant is credited with the FLOPs it skips);
- routed experts forward + backward, 24 local experts × ~1365 uneven rows, hidden 7168, width 2048
  (gate, up, down grouped GEMMs + SwiGLU) vs the per-expert loop: >= 75% of the GEMM peak.
Each section also checks its results against the reference, on this GPU, and records it.

Each section runs in its own process, so a kernel that faults (a poisoned CUDA context) or hangs
costs only its own numbers; a section is given what is left of --budget-s and no more, so the run
ends within the budget. Prints a table and writes a JSON report (--out), rewritten after every
section. Not a test: numbers for the record. Without CUDA it stops with one sentence (--smoke runs
tiny sizes on any device, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # GPU images run it from a checkout

from benchmarks.gpu_kernel_sections import SECTIONS, Bench, Sizes  # noqa: E402

# Section results that later sections judge against, passed from the parent to each child.
LIMITS = {"gemm": ("tflops", "gemm_tflops"), "copy": ("gbs", "copy_gbs")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-device.json", help="where the JSON report goes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget of the whole run; a section gets what is left of it")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on whatever device there is: checks the script, measures nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one section, write its result to --out
    parser.add_argument("--gemm-tflops", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--copy-gbs", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections got {','.join(unknown)}; expected a subset of {','.join(SECTIONS)}.")
    if args.budget_s <= 0:
        parser.error(f"--budget-s got {args.budget_s}; expected a positive number of seconds.")
    return args


def _environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    header = ("what", "measured", "baseline", "unit", "ratio", "target", "pass")
    lines = [header] + [
        (r["name"], _format(r.get("measured")), _format(r.get("baseline")), r.get("unit", ""),
         _format(r.get("ratio")), r.get("target") or "-",
         {True: "PASS", False: "FAIL", None: "-"}[r.get("pass")])
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_child(args: argparse.Namespace, device: torch.device) -> None:
    """One section in this process; its result (or its error) goes to --out as JSON."""
    bench = Bench(device, Sizes.smoke() if args.smoke else Sizes())
    bench.gemm_tflops, bench.copy_gbs = args.gemm_tflops, args.copy_gbs
    try:
        result = SECTIONS[args.child](bench)
    except Exception as error:  # recorded, not raised: the parent reports it beside the others
        print(f"  {args.child} failed: {type(error).__name__}: {error}", flush=True)
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    Path(args.out).write_text(json.dumps(result, default=str))


def _run_section(name: str, args: argparse.Namespace, limits: dict, seconds: float) -> dict:
    """Section `name` in a child process allowed `seconds`; its result, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "section.json"
        cmd = [sys.executable, __file__, "--child", name, "--out", str(path)] + (["--smoke"] if args.smoke else [])
        cmd += [f"--{key.replace('_', '-')}={value}" for key, value in limits.items() if value]
        try:
            proc = subprocess.run(cmd, timeout=seconds, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"the section ran past the {seconds:.0f} s left of the budget and was stopped"}
        if path.exists():
            return json.loads(path.read_text())
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"the section's process exited with code {proc.returncode} without a result",
                "stderr": proc.stderr[-3000:]}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    start = time.perf_counter()
    report = {"environment": _environment(device), "smoke": args.smoke, "sections": {}, "rows": []}
    limits = {"gemm_tflops": None, "copy_gbs": None}
    for name in args.sections.split(","):
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 1:
            result = {"skipped": f"the time budget of {args.budget_s:g} s was spent"}
        else:
            print(f"[{args.budget_s - left:6.1f} s] {name} ...", flush=True)
            result = _run_section(name, args, limits, left)
        if name in LIMITS and isinstance(result.get(LIMITS[name][0]), float):
            limits[LIMITS[name][1]] = result[LIMITS[name][0]]
        report["rows"].extend(result.pop("rows", []))
        report["sections"][name] = result
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench-device needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was measured.")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        run_child(args, device)
        return 0
    report = run(args, device)
    print()
    print_table(report["rows"])
    print(f"\n{report['environment'].get('gpu', device)}: {report.get('elapsed_s', 0):.0f} s; report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory of `k2train convert`, import and export, for three model sizes (not a test).

Each size is written in the released Kimi-K2 format (FP8 projections with 128 x 128 block scales,
index, config.json) by its own process; then the import (HF -> checkpoint) and the export
(checkpoint -> bf16 HF) each run in a fresh Python process that reports its peak RSS
(`ru_maxrss`) and its RSS before converting (torch and the code loaded). Streaming keeps the
conversion's own share flat: it holds one tensor on import and at most --working-set-mb on export,
whatever the model's size; what still grows is bookkeeping per tensor (the index, the DCP plan
and metadata), not tensor data. `make bench-convert` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
COMMON = ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1", "train.param_dtype=bfloat16",
          "model.max_position_embeddings=4096", "optimizer.adamw_block_elements=262144"]
NARROW = ["model.vocab_size=4096", "model.hidden_size=256", "model.dense_intermediate_size=512",
          "model.moe_intermediate_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=64"]
# small; wide: 4x the width (16x the parameters, the same tensors); deep: 8x the layers and 4x
# the experts (17x the parameters, 30x the tensors).
SIZES = {"small": [*NARROW, "model.num_layers=3", "model.num_experts=8"],
         "wide": ["model.vocab_size=16384", "model.hidden_size=1024", "model.dense_intermediate_size=2048",
                  "model.moe_intermediate_size=512", "model.q_lora_rank=512", "model.kv_lora_rank=256",
                  "model.num_layers=3", "model.num_experts=8"],
         "deep": [*NARROW, "model.num_layers=24", "model.num_experts=32"]}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, size: str, work: Path, working_set_mb: float) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from k2train.config.load import load_config
    from parallel.checkpoint.convert import export_hf, import_hf

    cfg = load_config(TINY, COMMON + SIZES[size])
    before = _rss_mib()
    if step == "write":
        from hf_files import write_k2_format
        from k2train.model import K2Model

        model = K2Model(cfg.model, seed=0)
        params = sum(p.numel() for p in model.parameters())
        write_k2_format(model, work / "hf", shards=8)
        print(json.dumps({"params": params}))
        return
    if step == "import":
        import_hf(cfg, work / "hf", work / "ckpt")
    else:
        export_hf(cfg, work / "ckpt", work / "hf-bf16", shard_bytes=32 << 20,
                  working_set_bytes=int(working_set_mb * 2**20))
    print(json.dumps({"before": before, "peak": _peak_mib()}))


def _run(step: str, size: str, work: Path, working_set_mb: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, size, str(work), str(working_set_mb)],
                         check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--working-set-mb", type=float, default=8.0)
    parser.add_argument("--child", nargs=4, metavar=("STEP", "SIZE", "WORK", "MB"))
    args = parser.parse_args()
    if args.child:
        step, size, work, mb = args.child
        child(step, size, Path(work), float(mb))
        return
    print(f"k2train convert, peak RSS per fresh process (export working set {args.working_set_mb:g} MiB)")
    print(f"{'model':>6} {'params':>12} {'HF bytes':>10} {'tensors':>8} {'step':>7} {'RSS before':>11} {'peak RSS':>9} {'growth':>8}")
    for size in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            params = _run("write", size, work, args.working_set_mb)["params"]
            hf_bytes = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
            tensors = len(json.loads((work / "hf" / "model.safetensors.index.json").read_text())["weight_map"])
            for step in ("import", "export"):
                r = _run(step, size, work, args.working_set_mb)
                print(f"{size:>6} {params:>12,} {hf_bytes / 2**20:>8.1f}Mi {tensors:>8} {step:>7} {r['before']:>9.1f}Mi "
                      f"{r['peak']:>7.1f}Mi {r['peak'] - r['before']:>6.1f}Mi")


if __name__ == "__main__":
    main()

"""memory.optimizer_offload: one owner's ZeRO-1 MuonClip update with its states on the device vs in
host memory, streamed chunk by chunk (not a test; prints numbers).

One process owns every item of a group: `--matrices` Muon matrices of `--shape` plus an AdamW
embedding `--embedding` and a norm. Per step: gradients into the float32 buffer, reduce, update,
gather. It prints the median step time with the states on the device and offloaded, the bytes in
each place, and on CUDA the time of a plain host <-> device copy of the same bytes, and so how much
of the streaming the update hides; then checks that both placements leave the same bits.

    python benchmarks/cpu_optimizer_offload.py                                  # CPU: small sizes
    python benchmarks/cpu_optimizer_offload.py --device cuda --matrices 24 --shape 2048x7168 \\
        --embedding 32768x7168                                              # K2's expert matrices
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from k2train.config.schema import OptimizerConfig
from parallel.zero1.optimizer import ShardGroup


def named_parameters(args: argparse.Namespace, device: torch.device) -> list[tuple[str, nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)
    rows, cols = args.shape
    vocab, hidden = args.embedding
    shapes = [("embed_tokens.weight", (vocab, hidden)), ("norm.weight", (hidden,))]
    shapes += [(f"layers.{i}.mlp.shared_experts.up_proj.weight", (rows, cols)) for i in range(args.matrices)]
    return [(name, nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device)))
            for name, shape in shapes]


def run(args: argparse.Namespace, device: torch.device, offload: bool) -> tuple[list[float], ShardGroup]:
    named = named_parameters(args, device)
    group = ShardGroup(named, 0, None, OptimizerConfig(), offload=offload, chunk_bytes=int(args.chunk_mb * (1 << 20)))
    generator = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=generator) * 1e-2).to(device) for _, p in named]
    times = []
    for step in range(args.warmup + args.steps):
        for (_, param), grad in zip(named, grads):
            param.grad = grad * (1 + step)
        _sync(device)
        start = time.perf_counter()
        group.accumulate_leftovers()
        group.reduce(1.0)
        group.update(1e-3, 1.0)
        group.gather()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times, group


def copy_seconds(nbytes: int, device: torch.device) -> float:
    """A plain pinned host -> device and device -> host copy of `nbytes` (what streaming must move)."""
    host = torch.zeros(nbytes // 4, dtype=torch.float32, pin_memory=True)
    on_device = torch.zeros_like(host, device=device)
    on_device.copy_(host)
    _sync(device)
    start = time.perf_counter()
    on_device.copy_(host, non_blocking=True)
    host.copy_(on_device, non_blocking=True)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = lambda text: tuple(int(v) for v in text.split("x"))  # noqa: E731
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--matrices", type=int, default=24)
    parser.add_argument("--shape", type=size, default=(256, 512))
    parser.add_argument("--embedding", type=size, default=(8192, 256))
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_device, kept = run(args, device, offload=False)
    offloaded, streamed = run(args, device, offload=True)
    total = kept.optimizer_state_bytes()
    print(f"device {device}: {args.matrices} Muon matrices {args.shape[0]}x{args.shape[1]}, AdamW embedding "
          f"{args.embedding[0]}x{args.embedding[1]} and a norm; chunks of {args.chunk_mb} MiB "
          f"({len(streamed.states.layout.chunks)} chunks)")
    print(f"optimizer states: {total / 2**20:.1f} MiB; offloaded: {streamed.optimizer_state_bytes_by_place()}")
    step_on, step_off = statistics.median(on_device), statistics.median(offloaded)
    print(f"update + gather per step, median of {args.steps}: states on device {step_on * 1e3:.1f} ms, "
          f"offloaded {step_off * 1e3:.1f} ms (+{(step_off - step_on) * 1e3:.1f} ms)")
    if device.type == "cuda":
        copies = copy_seconds(total, device)
        print(f"a plain copy of the states to the device and back: {copies * 1e3:.1f} ms "
              f"({2 * total / copies / 1e9:.1f} GB/s); hidden by the overlap: "
              f"{max(0.0, 1 - (step_off - step_on) / copies) * 100:.0f}% of it")
    else:
        print("on CPU the chunk copies run in order (host and device are one memory): nothing to overlap")
    same = all(torch.equal(a.data, b.data) for a, b in zip(kept.params, streamed.params))
    states = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(kept.checkpoint_tensors().values(),
                                                                 streamed.checkpoint_tensors().values()))
    print(f"parameters after {args.warmup + args.steps} steps bit-identical: {same}; optimizer states: {states}")


if __name__ == "__main__":
    main()

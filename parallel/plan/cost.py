"""The hardware a plan is made for, the communication of a step, and a roofline step time.

The estimate is deliberately simple and states its assumptions (listed by `assumptions`):
compute runs at a fixed fraction of the GPU's peak BF16 rate; the EP all-to-all and the pipeline
sends hide under compute when they take less time (K2 §2.4: extra warm-up micro-batches of
interleaved 1F1B hide the all-to-all, the weight-gradient split hides the PP sends); as built, only
what the runtime hides is (parallel/plan/exposed_time.py, with parallel.overlap=ep
parallel/pipeline/overlap.py); the gradient
reduce-scatter, the parameter all-gather and the optimizer update run after the schedule, exposed
(as `parallel/runner.py` runs them); the pipeline adds its bubble (p - 1) / (v * m).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    """One kind of node: its GPUs, their links and the host memory beside them."""

    name: str
    gpu_memory_gib: float  # device memory per GPU
    peak_tflops: float  # dense BF16 tensor-core peak per GPU
    nvlink_gbs: float  # GB/s per GPU per direction inside a node
    network_gbs: float  # GB/s per GPU per direction to other nodes
    pcie_gbs: float  # GB/s per GPU per direction between host and device (pinned copies)
    host_memory_gib: float  # per node
    reserved_gib: float = 3.0  # CUDA context, NCCL buffers and allocator slack, per GPU
    efficiency: float = 0.53  # fraction of the peak a training step's GEMMs reach

    @property
    def usable_bytes(self) -> int:
        return int((self.gpu_memory_gib - self.reserved_gib) * GiB)


# K2 §2.4: H800 nodes of 8 GPUs on NVLink, 8 x 400 Gbps RoCE, 2 TB of host memory. The H800 has the
# H100's compute and memory and a narrower NVLink (400 GB/s both directions together). PCIe: the
# pinned copy rate measured on an H200 node (docs/ARCHITECTURE.md#h200-limits, 55 GB/s). Efficiency: one K2 decoder
# layer's forward and backward ran at 523 TFLOP/s on an H200 (docs/ARCHITECTURE.md#h200-limits), 53% of 989.
HARDWARE = {
    "h800": Hardware("H800 SXM", 80, 989, 200, 50, 55, 2048),
    "h100": Hardware("H100 SXM", 80, 989, 450, 50, 55, 2048),
    "h200": Hardware("H200 SXM", 141, 989, 450, 50, 55, 2048),
}


def device_hardware(device) -> Hardware:
    """What the runner plans its `auto` activation offload budget for: `k2train plan`'s default
    preset (h800) with a CUDA device's own memory; on CPU the preset as it is, so a CPU run takes
    the budgets `k2train plan` shows."""
    hw = HARDWARE["h800"]
    if device.type != "cuda":
        return hw
    import torch

    props = torch.cuda.get_device_properties(device)
    return replace(hw, name=props.name, gpu_memory_gib=props.total_memory / GiB)


@dataclass(frozen=True)
class LinkTraffic:
    """Bytes one GPU sends per step over one kind of traffic, where they go, and how long they take."""

    name: str
    bytes_sent: int
    seconds: float
    overlapped: bool  # runs during the schedule, under compute; otherwise after it
    where: str  # "NVLink", "network", "PCIe", "NVLink + network"
    fits_under_compute: bool  # its time is at most the rank's compute time

    @property
    def hidden(self) -> bool:
        return self.overlapped and self.fits_under_compute


def link_seconds(nbytes: float, local_fraction: float, hw: Hardware) -> float:
    """Time to send `nbytes`, `local_fraction` of them over NVLink and the rest over the network,
    both at once."""
    return max(nbytes * local_fraction / (hw.nvlink_gbs * 1e9), nbytes * (1 - local_fraction) / (hw.network_gbs * 1e9))


def collective_seconds(nbytes: float, size: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring reduce-scatter or all-gather of a `nbytes` buffer over `size` ranks: each sends
    (size - 1) / size of it, at the slowest link's rate."""
    if size <= 1:
        return 0.0
    rate = (hw.network_gbs if spans_nodes else hw.nvlink_gbs) * 1e9
    return nbytes * (size - 1) / size / rate


def bubble(pp: int, vp: int, micro_batches: int) -> float:
    """Interleaved 1F1B's idle fraction (p - 1) / (v * m) of the busy time (schedule_table.py)."""
    return (pp - 1) / (vp * micro_batches) if pp > 1 else 0.0


def assumptions(hw: Hardware, attention: str) -> list[str]:
    return [
        f"hardware: {hw.name}, {hw.gpu_memory_gib:g} GiB per GPU of which {hw.reserved_gib:g} GiB are kept for the "
        f"CUDA context, NCCL and allocator slack; {hw.peak_tflops:g} TFLOP/s BF16 peak; NVLink {hw.nvlink_gbs:g} GB/s, "
        f"network {hw.network_gbs:g} GB/s, PCIe {hw.pcie_gbs:g} GB/s per GPU and direction; "
        f"{hw.host_memory_gib:g} GiB host memory per node, shared by its GPUs; host memory bandwidth not modelled",
        f"compute at {hw.efficiency:.0%} of peak (a K2 layer's forward+backward reached 523 TFLOP/s on an H200, "
        f"docs/ARCHITECTURE.md#h200-limits); FLOPs of matrix products only; backward = 2x forward; recomputation adds its GEMMs",
        f"attention: {attention} ("
        + ("a flash-attention kernel: saves q, k, v, output and the row log-sum-exp, computes the causal half)"
           if attention == "fused" else
           "the eager path: keeps the S x S probabilities, computes the whole square)"),
        "routing is balanced: every EP rank receives as many routed rows as it sends (T x top-k)",
        "EP all-to-all, pipeline sends and activation offload copies hide under compute when shorter than it "
        "(K2 §2.4); what exceeds compute is added. As built: the EP all-to-all hides only with parallel.overlap=ep "
        "(otherwise all of it is added), and then not in the unpaired warm-up and cool-down, nor where it outlasts "
        "the paired task's compute; every schedule step that takes its input from another pipeline rank waits "
        "for that transfer (parallel/plan/exposed_time.py)",
        "gradient reduce-scatter, parameter all-gather and the optimizer update run after the pipeline "
        "schedule, not overlapped (parallel/runner.py); ring collectives at the slowest link's rate",
        "pipeline bubble (p - 1) / (v * m) of the busiest pipeline rank's compute; "
        "the zero-bubble schedule is counted as interleaved 1F1B",
        "MFU counts model FLOPs (causal attention, no recomputation) over world x peak x step time",
    ]

"""Which micro-batches' saved activations go to host memory under a device budget (K2 §2.4.3).

K2 offloads what does not fit and hides the copies under compute. With
`memory.activation_offload_budget_gib` the floating-point saved activations of a pipeline rank may
occupy at most that much device memory at any point of the step; walking the rank's executed
schedule, whenever a forward would exceed it, the micro-batches kept on the device are those whose
backward comes soonest, and the one whose backward comes last goes to host memory (from its
forward on). One pure function decides it for the runner (parallel/runner.py) and the plan
(parallel/plan/planner.py), so the plan's host bytes are the ones the runtime copies. With `auto` each
pipeline rank's budget is what its planned device peak leaves free (`auto_budget`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GiB = 1 << 30
AUTO = "auto"


@dataclass(frozen=True)
class RankOffload:
    """What activation offload does on one pipeline rank in one step."""

    budget: int  # bytes of floating-point saved activations the rank may keep on the device
    auto: bool  # the budget is what the rank's planned peak leaves free
    keys: frozenset[tuple[int, int]]  # the (stage, micro-batch) whose saved tensors go to host
    host_bytes: int  # copied to host per step (and back)
    device_peak: int  # the most kept on the device at once (at most the budget)
    host_peak: int  # the most waiting in host memory at once
    refusal: str | None = None  # auto, and the rank does not fit even with everything offloaded


def rank_offload(setting: float | str | None, ops: Sequence[tuple[str, int]], floating: Mapping[int, int],
                 device_bytes: int, peak: int, schedule_peak: int, rank: int) -> RankOffload:
    """Pipeline rank `rank`'s offload under `memory.activation_offload_budget_gib` = `setting`:
    `floating[stage]` is one micro-batch's bytes the offloader copies, `peak` and `schedule_peak`
    the rank's planned device peaks with every micro-batch offloaded (see `auto_budget`). A rank
    that does not fit under `auto` is planned with budget 0 and carries the runner's refusal, so
    that `k2train plan` can still show where its memory goes."""
    auto, refusal = setting == AUTO, None
    try:
        budget = auto_budget(device_bytes, peak, schedule_peak, rank) if auto else budget_bytes(setting)
    except ValueError as err:
        budget, refusal = 0, str(err)
    keys = offloaded_keys(ops, floating, budget)
    device, host = offload_levels(ops, floating, keys)
    return RankOffload(budget, auto, frozenset(keys), host_bytes(keys, floating), device, host, refusal)


def keyed_ops(ops: Sequence[tuple[str, int]]) -> list[tuple[str, tuple[int, int]]]:
    """(kind, (stage, micro-batch)) for (kind, stage) ops: a stage runs its forwards, and its
    backwards, in micro-batch order."""
    seen: dict[tuple[str, int], int] = {}
    out = []
    for kind, stage in ops:
        index = seen.get((kind, stage), 0)
        seen[(kind, stage)] = index + 1
        out.append((kind, (stage, index)))
    return out


def offloaded_keys(ops: Sequence[tuple[str, int]], floating: Mapping[int, int], budget: int) -> set[tuple[int, int]]:
    """The (stage, micro-batch) keys whose floating-point saved tensors go to host so that the ones
    kept on the device never exceed `budget` bytes; `floating[stage]` is one micro-batch's bytes."""
    if budget < 0:
        raise ValueError(f"the activation budget is {budget} bytes; expected at least 0.")
    keyed = keyed_ops(ops)
    backward_at = {key: i for i, (kind, key) in enumerate(keyed) if kind == "B"}
    resident: set[tuple[int, int]] = set()
    level, out = 0, set()
    for kind, key in keyed:
        if kind == "B":
            if key in resident:
                resident.discard(key)
                level -= floating[key[0]]
            continue
        resident.add(key)
        level += floating[key[0]]
        while level > budget:
            # Belady's choice: the micro-batch needed last leaves the device.
            victim = max(resident, key=lambda k: backward_at.get(k, len(keyed)))
            resident.discard(victim)
            level -= floating[victim[0]]
            out.add(victim)
    return out


def offload_levels(ops: Sequence[tuple[str, int]], floating: Mapping[int, int], keys: set[tuple[int, int]]) -> tuple[int, int]:
    """(peak bytes kept on the device, peak bytes waiting in host memory) of the floating-point
    saved tensors over the schedule, when `keys` go to host."""
    device = host = top_device = top_host = 0
    for kind, key in keyed_ops(ops):
        sign = 1 if kind == "F" else -1
        if key in keys:
            host += sign * floating[key[0]]
        else:
            device += sign * floating[key[0]]
        top_device, top_host = max(top_device, device), max(top_host, host)
    return top_device, top_host


def auto_budget(device_bytes: int, peak: int, schedule_peak: int, rank: int) -> int:
    """`memory.activation_offload_budget_gib: auto`: the largest budget pipeline rank `rank` can keep
    on the device, so the smallest offload that fits. `peak` is its device peak with every saved
    activation offloaded, `schedule_peak` the part of it during the schedule, where the budget adds
    (the update's transients come after the schedule); `device_bytes` what the device offers."""
    if peak > device_bytes:
        raise ValueError(f"pipeline rank {rank} peaks at {_size(peak)} with every saved activation offloaded, "
                         f"over the {_size(device_bytes)} of device memory it may use.")
    return device_bytes - schedule_peak


def _size(n: int) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):,.2f} MiB"


def host_bytes(keys: set[tuple[int, int]], floating: Mapping[int, int]) -> int:
    """Bytes copied to host per step for the offloaded `keys`."""
    return sum(floating[stage] for stage, _ in keys)


def budget_bytes(gib: float | None) -> int:
    """A numeric budget in bytes; None offloads every micro-batch (a budget of 0)."""
    return 0 if gib is None else int(gib * GiB)

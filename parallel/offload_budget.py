"""Which micro-batches' saved activations go to host memory under a device budget (K2 §2.4.3).

K2 offloads what does not fit and hides the copies under compute. With
`memory.activation_offload_budget_gib` the floating-point saved activations of a pipeline rank may
occupy at most that much device memory at any point of the step; walking the rank's executed
schedule, whenever a forward would exceed it, the micro-batches kept on the device are those whose
backward comes soonest, and the one whose backward comes last goes to host memory (from its
forward on). One pure function decides it for the runner (parallel/runner.py) and the plan
(parallel/plan.py), so the plan's host bytes are the ones the runtime copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

GiB = 1 << 30


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


def host_bytes(keys: set[tuple[int, int]], floating: Mapping[int, int]) -> int:
    """Bytes copied to host per step for the offloaded `keys`."""
    return sum(floating[stage] for stage, _ in keys)


def budget_bytes(gib: float | None) -> int | None:
    """The budget in bytes; None offloads every micro-batch (a budget of 0)."""
    return 0 if gib is None else int(gib * GiB)

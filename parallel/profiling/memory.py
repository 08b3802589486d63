"""Memory of a profiled rank: what it holds, what its forwards leave saved for backward, and the
check that a config can fit at all before anything is built.

On CUDA the profile reports the allocator's peak (`torch.cuda.max_memory_allocated`) over the
measured steps. CPU has no such counter, so there the peak is accounted: parameters, ZeRO-1
gradient buffers, optimizer states (master weights and moments), plus the most activation bytes
held for backward at once, counted by saved-tensor hooks during one step (each storage once, the
parameters' own storages not at all, as `k2train/memory/fp8.py` `saved_bytes` does) and replayed
against the order in which that step's forwards and backwards ran (`peak_saved_bytes`). Both figures
are reported on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from k2train.config.checks import ConfigError
from k2train.config.schema import JobConfig
from parallel.layout import Layout, RankCoords
from parallel.plan.params import rank_params
from parallel.profiling.timing import Recorder, Span

_GIB = 1024**3


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


class SavedCounter:
    """Counts the bytes each forward leaves saved for backward, while `recorder.count_saved`.

    When the runner already has saved-tensor hooks (`runner.saved`: activation offload), only the
    innermost pair of hooks runs, so the runner's own count is read instead of installing ours;
    only what stays on the device counts then.
    """

    def __init__(self, runner, recorder: Recorder):
        self.recorder = recorder
        self.runner_saved = runner.saved
        self._live = {_storage_key(t) for t in [*runner.model.parameters(), *runner.model.buffers()]}

    @contextlib.contextmanager
    def counting(self, span: Span | None) -> Iterator[None]:
        if span is None or not self.recorder.count_saved:
            yield
        elif self.runner_saved is not None:
            before = self.runner_saved.bytes.total("device")
            yield
            span.saved_bytes = self.runner_saved.bytes.total("device") - before
        else:
            seen: set[tuple[torch.device, int]] = set()
            held: list[torch.Tensor] = []  # kept until the forward ends: no address is reused mid-count

            def pack(t: torch.Tensor) -> torch.Tensor:
                key = _storage_key(t)
                if key not in seen and key not in self._live:
                    seen.add(key)
                    span.saved_bytes += t.untyped_storage().nbytes()
                held.append(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield


def held_bytes(runner) -> dict[str, int]:
    """Bytes the rank holds whatever the step: parameters, gradient buffers, optimizer states."""
    optimizer = runner.optimizer
    return dict(
        parameters=sum(p.numel() * p.element_size() for p in runner.model.parameters()),
        gradient_buffers=sum(g.grads.nbytes + (0 if g.grad_region is g.grads else g.grad_region.nbytes)
                             for g in optimizer.groups),
        optimizer_states=optimizer.optimizer_state_bytes(),
    )


def check_fits(cfg: JobConfig, layout: Layout, device: torch.device) -> None:
    """Stop, before anything is allocated, a layout whose largest rank needs more memory for its
    parameters and float32 gradient buffer alone (activations and optimizer states come on top)
    than a rank has. Every rank checks the same largest rank, so all stop together."""
    heaviest = max((rank_params(cfg, layout, layout.rank_of(RankCoords(pp, 0, 0))) for pp in range(layout.pp)),
                   key=lambda r: r.held)
    need = heaviest.held * (heaviest.bytes_per_param + 4)
    have, where = available_bytes(device)
    if need <= have:
        return
    c = heaviest.coords
    raise ConfigError(
        f"{cfg.name} needs at least {need / _GIB:,.1f} GiB on rank {heaviest.rank} (pp {c.pp}, ep {c.ep}) for its "
        f"{heaviest.held:,} parameters ({cfg.train.param_dtype}) and their float32 gradient buffer, but {where} "
        f"is {have / _GIB:,.1f} GiB; run it on a layout with more ranks (this one is pp {layout.pp} x ep {layout.ep} "
        f"x dp {layout.dp}) or shrink the model with --set (e.g. model.num_layers, model.num_experts)."
    )


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory for one rank, and where: the GPU's free memory, or this host's available memory
    shared by the ranks torchrun started on it (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"the free memory of {torch.cuda.get_device_name(device)}"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = _host_available_bytes()
    if local_ranks == 1:
        return available, "this host's available memory"
    return available // local_ranks, (f"a rank's share of this host's available memory "
                                      f"({available / _GIB:,.1f} GiB over {local_ranks} ranks)")


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

"""The runtime's collectives object (parallel/collectives.py): torch.distributed's results, with an
observer entered around each synchronous call and none around asynchronous ones."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist


def test_collectives_give_torch_results_and_tell_the_observer(tmp_path):
    from parallel.collectives import Collectives

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        seen = []

        @contextmanager
        def observer(name, nbytes):
            seen.append((name, nbytes, "enter"))
            yield
            seen.append((name, nbytes, "exit"))

        collectives = Collectives()
        x = torch.arange(6, dtype=torch.float32)
        out = torch.empty_like(x)
        with collectives.observed(observer):
            collectives.all_reduce(x, op=dist.ReduceOp.MAX)
            collectives.all_to_all_single(out, x, [6], [6])
            collectives.all_to_all_single(out, x, None, None, async_op=True).wait()
            collectives.reduce_scatter(out, x)
            collectives.all_gather_into_tensor(out, x.half().float())
        collectives.all_reduce(x)
        assert collectives.observer is None
        torch.testing.assert_close(out, torch.arange(6, dtype=torch.float32))
        names = ["all_reduce", "all_to_all_single", "reduce_scatter", "all_gather_into_tensor"]
        assert seen == [(n, 24, when) for n in names for when in ("enter", "exit")]
    finally:
        dist.destroy_process_group()

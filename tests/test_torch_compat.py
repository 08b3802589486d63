"""torch's private pipelining code, as parallel/pipeline/torch_compat.py uses it, on the installed torch.

- Every private name, field and signature the module reaches is where it expects it, and its
  linear-time UNSHARD/RESHARD pass lowers like torch's; a moved one is reported by name.
- The version gate passes the torch releases the module was written for, checks a pre-release of
  them, warns on another torch whose internals are in place, and refuses one whose internals moved
  with one sentence.
- On a PP2 x VP2 gloo world of toy stages, each schedule class (the table's interleaved 1F1B and
  both paired schedules with their OVERLAP_F_B function) runs the table's order with the lean
  receive stage: two steps give the losses and gradients of one process, every receive buffer is
  allocated once when posted and none is alive after a step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from multiproc import run_world
from parallel.pipeline import torch_compat
from parallel.pipeline.schedule_table import timeline
from parallel.pipeline.torch_compat import (
    check_torch, internals_problems, paired_actions, to_action, without_paired_forward_sends)

PP, VP, MICRO_BATCHES, ROWS, WIDTH = 2, 2, 4, 2, 8
SCHEDULES = ("TheoryInterleaved1F1B", "PairedInterleaved1F1B", "PairedInterleavedZeroBubble")
PORT = "parallel/pipeline/torch_compat.py needs porting to this torch"


def test_private_names_and_signatures_are_in_place():
    problems = internals_problems()
    assert problems == [], f"torch {torch.__version__}: {'; '.join(problems)} ({PORT})"


def test_a_moved_private_name_is_reported_and_refused(monkeypatch):
    from torch.distributed.pipelining import PipelineStage

    monkeypatch.setattr(PipelineStage, "get_fwd_recv_ops", lambda self, chunk, stream: [])
    monkeypatch.delattr("torch.distributed.pipelining.schedules._PipelineSchedule._maybe_get_loss")
    problems = internals_problems()
    assert "PipelineStage.get_fwd_recv_ops takes (chunk, stream), not (fwd_chunk_id)" in problems
    assert "ScheduleInterleaved1F1B._maybe_get_loss is missing" in problems
    with pytest.raises(RuntimeError) as refused:
        check_torch("2.99.0")
    sentence = str(refused.value)
    assert sentence.startswith("torch 2.99.0 is installed") and "torch 2.13 and 2.12" in sentence
    assert "get_fwd_recv_ops" in sentence and "(and 1 more)" in sentence and "install torch==2.13.0" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".") and "\n" not in sentence
    # A pre-release of a supported version (the GPU image's snapshot) is looked at too.
    with pytest.raises(RuntimeError, match=r"^torch 2\.12\.0a0\+5aff3928d8\.nv26\.05 is installed"):
        check_torch("2.12.0a0+5aff3928d8.nv26.05")
    # The releases it was written for pass without looking (CI runs the tests on both).
    check_torch("2.13.0+cpu")
    check_torch("2.12.0")


def test_another_torch_with_its_internals_in_place_passes_with_a_warning():
    with pytest.warns(UserWarning, match=r"torch 2\.99\.0 is not one k2train's pipeline was tested on"):
        check_torch("2.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_torch("2.12.0a0+5aff3928d8.nv26.05")  # a supported minor version: no warning


# ---- the hooks on a toy pipeline -----------------------------------------------------------------

class ToyStage(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return torch.tanh(self.linear(x))


def toy_layers() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(WIDTH, WIDTH) for _ in range(PP * VP)]


def toy_loss(output, target):
    return ((output - target) ** 2).sum()


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(MICRO_BATCHES * ROWS, WIDTH, generator=generator),
            torch.randn(MICRO_BATCHES * ROWS, WIDTH, generator=generator))


def run_schedules(payload: dict) -> dict:
    """One rank: each schedule class for two steps; its order, log, losses and gradients."""
    import torch.distributed as dist

    from parallel.pipeline.buffers import ReceiveBufferLog
    from parallel.pipeline.overlap import Turns
    from parallel.pipeline.receive_stage import LeanReceiveStage
    from parallel.pipeline.torch_compat import ComputationType, overlap_forward_backward

    dist.init_process_group("gloo")
    rank, results = dist.get_rank(), {}
    x, target = toy_batch()
    for name in SCHEDULES:
        layers, log, turns = toy_layers(), ReceiveBufferLog(), Turns(watch_receives=True)
        stages = [LeanReceiveStage(ToyStage(layers[s]), s, PP * VP, torch.device("cpu"), log=log,
                                   input_args=(torch.empty(ROWS, WIDTH, device="meta", requires_grad=s > 0),),
                                   output_args=(torch.empty(ROWS, WIDTH, device="meta", requires_grad=True),))
                  for s in (rank, rank + PP)]
        schedule = getattr(torch_compat, name)(stages, n_microbatches=MICRO_BATCHES, loss_fn=toy_loss,
                                               scale_grads=False)
        if name.startswith("Paired"):
            schedule.register_custom_function(ComputationType.OVERLAP_F_B, overlap_forward_backward(turns))
        steps = []
        for _ in range(2):
            for layer in layers:
                layer.zero_grad()
            log.reset()
            losses: list[torch.Tensor] = []
            schedule.step(*((x,) if rank == 0 else ()), target=target if rank == PP - 1 else None,
                          losses=losses if rank == PP - 1 else None)
            steps.append(dict(losses=[loss.detach() for loss in losses], allocations=log.allocations,
                              alive=log.alive()))
        turns.close()
        results[name] = dict(order=[None if a is None else str(a) for a in schedule.pipeline_order[rank]],
                             steps=steps, grads={s: (layers[s].weight.grad, layers[s].bias.grad)
                                                 for s in (rank, rank + PP)})
    dist.destroy_process_group()
    return results


def one_process() -> tuple[list[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    layers = toy_layers()
    losses = []
    for x, target in zip(*(t.chunk(MICRO_BATCHES) for t in toy_batch())):
        for layer in layers:
            x = torch.tanh(layer(x))
        loss = toy_loss(x, target)
        loss.backward()
        losses.append(loss.detach())
    return losses, {s: (layer.weight.grad, layer.bias.grad) for s, layer in enumerate(layers)}


def table_order(name: str, rank: int) -> list[str | None]:
    if name == "TheoryInterleaved1F1B":
        return [None if op is None else str(to_action(op)) for op in timeline(PP, VP, MICRO_BATCHES)[rank]]
    return [str(a) for a in paired_actions(PP, VP, MICRO_BATCHES, rank, name.endswith("ZeroBubble"))]


def test_a_paired_forwards_send_leaves_the_lowered_order_and_nothing_else():
    """torch's lowering of the paired order puts each paired forward's SEND_F right after its pair;
    `without_paired_forward_sends` drops exactly those (the pair sends them itself, in the same place
    in the order of sends) and refuses a lowering that puts anything between."""
    C = torch_compat.ComputationType
    compute = {rank: paired_actions(PP, VP, MICRO_BATCHES, rank, split_backward=False) for rank in range(PP)}
    lowered = torch_compat.with_send_recv(compute, PP, PP * VP)
    for rank, line in lowered.items():
        kept = without_paired_forward_sends(line, PP * VP)
        forwards = [a.sub_actions[0] for a in line if a.computation_type == C.OVERLAP_F_B]
        sent_early = [torch_compat.Action(f.stage_index, C.SEND_F, f.microbatch_index)
                      for f in forwards if f.stage_index != PP * VP - 1]
        assert sent_early and [a for a in line if a not in kept] == sent_early
        assert kept == [a for a in line if a not in sent_early]
        pair = next(i for i, a in enumerate(line) if a.computation_type == C.OVERLAP_F_B and line[i + 1] in sent_early)
        moved = line[:pair + 1] + [torch_compat.Action(0, C.RECV_B, 99)] + line[pair + 1:]
        with pytest.raises(RuntimeError, match="right after it"):
            without_paired_forward_sends(moved, PP * VP)


def test_the_private_hooks_drive_torchs_runtime_like_one_process():
    ranks = run_world(PP, "test_torch_compat:run_schedules", {})
    losses, grads = one_process()
    for rank, results in enumerate(ranks):
        for name in SCHEDULES:
            got, where = results[name], f"torch {torch.__version__}, {name}, pipeline rank {rank}"
            assert got["order"] == table_order(name, rank), f"{where}: the runtime ignores the table's order ({PORT})"
            # Receiving: stage inputs of the stages after the first, gradients of those before the last.
            receiving = sum(s > 0 for s in (rank, rank + PP)) + sum(s < PP * VP - 1 for s in (rank, rank + PP))
            for step in got["steps"]:
                assert step["allocations"] == receiving * MICRO_BATCHES, f"{where}: receive buffers ({PORT})"
                assert step["alive"] == [], f"{where}: receive buffers alive after the step ({PORT})"
                if rank == PP - 1:
                    assert torch.allclose(torch.stack(step["losses"]), torch.stack(losses)), f"{where}: losses"
            for stage, (weight, bias) in got["grads"].items():
                assert torch.allclose(weight, grads[stage][0], atol=1e-6), f"{where}: stage {stage} gradients"
                assert torch.allclose(bias, grads[stage][1], atol=1e-6), f"{where}: stage {stage} gradients"

"""Every use of torch's private pipelining code (torch.distributed.pipelining), in one place.

k2train runs K2 §2.4's interleaved 1F1B and zero-bubble schedules with torch's pipelining runtime,
and changes it at four seams torch does not make public:
- the order: `_calculate_single_rank_operations` returns the schedule table's operations
  (parallel/pipeline/schedule_table.py `Op`, the only encoding of the order) as torch `_Action`s;
  `to_action` is the one conversion;
- the pairs of communication overlap: an `OVERLAP_F_B` action (`paired_actions`) whose registered
  function (`overlap_forward_backward`) reads the runtime's private state (`fwd_recv_ops`,
  `bwd_recv_ops`, `backward_counter`, `_maybe_compute_loss`, `_maybe_get_loss`), because torch
  passes a custom function only the action and a context; it sends a paired forward's output as
  soon as that forward ends (`_batch_p2p`), the lowering's `SEND_F` dropped
  (`without_paired_forward_sends`, in `_prepare_schedule_with_comms`) and the sends waited for at
  the end of `_step_microbatches`; the unpaired full backwards of an overlapped schedule run by
  `lone_backward`, which does what the runtime does for them inside `Turns.run_alone`;
- the receive buffers: six `PipelineStage` methods overridden by `LeanReceiveStage`
  (parallel/pipeline/receive_stage.py, with this module's `RecvInfo` and `make_tensor_from_meta`;
  why: parallel/pipeline/buffers.py);
- the lowering: torch's `_add_reduce_grad` and `_add_send_recv` with a linear-time equal of its
  `_add_unshard_reshard` (`lower`), so that `k2train plan` counts the buffers the runtime allocates.
The rest of k2train uses only the public names of this module: `Action` and `ComputationType` are
torch's action tuple and its kinds, `schedule_stages` the stages a schedule runs, `RecvInfo` and
`make_tensor_from_meta` a receive's descriptor and its buffer's maker.

Version gate. The module was written against torch 2.13 and the suite also passes on torch 2.12,
the release of the 2.12.0a0 that the GPU image (nvcr.io/nvidia/pytorch:26.05-py3) brings; CI runs
the pipeline tests on both (`make test-image-torch`). `check_torch` runs once, on import: a release
of these passes; a pre-release of them (the image's snapshot), or a torch of another minor version
(with a warning that its behaviour is untested), passes only if the private names, fields and
signatures used here are where this module expects them (`internals_problems`, the static half of
tests/test_torch_compat.py); otherwise the import fails with one sentence naming the installed
torch, the supported ones and what to do.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

WRITTEN_FOR = ("2.13", "2.12")  # torch minor versions the pipeline tests pass on (CI runs both)


def _refusal(version: str, problem: str) -> str:
    return (f"torch {version} is installed, but k2train's pipeline uses torch's private pipelining code as torch "
            f"{' and '.join(WRITTEN_FOR)} define it, and here {problem}; install torch==2.13.0, or port "
            f"parallel/pipeline/torch_compat.py to this torch until tests/test_torch_compat.py passes.")


try:
    from torch.distributed.pipelining._utils import _make_tensor_from_meta
    from torch.distributed.pipelining.schedules import (
        _Action,
        _add_reduce_grad,
        _add_send_recv,
        _add_unshard_reshard,
        _batch_p2p,
        _ComputationType,
        _PipelineContext,
    )
    from torch.distributed.pipelining.stage import _RecvInfo
except ImportError as error:
    raise ImportError(_refusal(torch.__version__, f"the import failed ({error})")) from error

from parallel.pipeline.schedule_table import Op, paired_order, timeline

Action = _Action
ComputationType = C = _ComputationType
# torch's own UNSHARD/RESHARD pass, the reference `with_unshard_reshard` equals (quadratic).
torch_add_unshard_reshard = _add_unshard_reshard
# A receive's descriptor and its buffer's maker, for parallel/pipeline/receive_stage.py.
RecvInfo = _RecvInfo
make_tensor_from_meta = _make_tensor_from_meta


# ---- the gate -----------------------------------------------------------------------------------

# Parameters (after self) this module passes or overrides, by owner and name; torch may add more
# after them only with defaults.
_SIGNATURES: dict[tuple[object, str], tuple[str, ...]] = {
    (PipelineStage, "_setup_forward_recv_info"): ("num_microbatches", "has_backward"),
    (PipelineStage, "_create_grad_recv_info"): ("act_send_info",),
    (PipelineStage, "get_fwd_recv_ops"): ("fwd_chunk_id",),
    (PipelineStage, "get_bwd_recv_ops"): ("bwd_chunk_id",),
    (PipelineStage, "forward_one_chunk"): ("fwd_chunk_id", "args", "kwargs", "save_forward_output"),
    (PipelineStage, "backward_one_chunk"): ("bwd_chunk_id", "loss", "full_backward", "last_backward"),
    (PipelineStage, "backward_weight_one_chunk"): ("bwd_chunk_id",),
    (_RecvInfo, "__init__"): ("input_name", "source", "buffer", "tensor_meta", "is_root_arg"),
    (ScheduleInterleaved1F1B, "_calculate_single_rank_operations"): ("rank",),
    (ScheduleInterleaved1F1B, "register_custom_function"): ("computation_type", "custom_function"),
    (ScheduleInterleaved1F1B, "_maybe_compute_loss"): ("stage", "output", "target_mbs", "mb_index"),
    (ScheduleInterleaved1F1B, "_maybe_get_loss"): ("stage", "mb_index"),
    (ScheduleInterleaved1F1B, "_prepare_schedule_with_comms"): ("actions", "format"),
    (ScheduleInterleaved1F1B, "_step_microbatches"): ("arg_mbs", "kwarg_mbs", "target_mbs", "losses"),
    (PipelineStage, "get_fwd_send_ops"): ("fwd_chunk_id",),
}
_FUNCTIONS: dict[Callable, tuple[str, ...]] = {
    _make_tensor_from_meta: ("meta", "device"),
    _add_reduce_grad: ("actions", "n_microbatches"),
    _add_send_recv: ("compute_actions", "stage_to_rank", "num_stages"),
    _add_unshard_reshard: ("compute_actions", "max_active_stages"),
    _batch_p2p: ("p2p_ops", "desc"),
}
# Instance attributes read here, set by the owner's __init__ (or a base class's).
_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    PipelineStage: ("args_recv_info", "grad_recv_info", "has_backward", "stage_index", "device"),
    ScheduleInterleaved1F1B: ("_stages", "_n_microbatches", "pp_group_size", "n_local_stages", "fwd_recv_ops",
                              "bwd_recv_ops", "backward_counter", "pipeline_order", "_num_stages"),
}
_ACTION_FIELDS = ("stage_index", "computation_type", "microbatch_index", "sub_actions")
_KINDS = ("FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "OVERLAP_F_B", "SEND_F", "RECV_F",
          "RECV_B", "UNSHARD", "RESHARD")
_CONTEXT_FIELDS = ("schedule_ref", "arg_mbs", "kwarg_mbs", "target_mbs")


def _signature_problem(name: str, function: Callable, expected: tuple[str, ...]) -> str | None:
    if function is None:
        return f"{name} is missing"
    params = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    names = tuple(p.name for p in params[:len(expected)])
    extra_required = [p.name for p in params[len(expected):]
                      if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if names != expected or extra_required:
        return f"{name} takes ({', '.join(p.name for p in params)}), not ({', '.join(expected)})"
    return None


def _sets_attribute(cls: type, name: str) -> bool:
    inits = [vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k) and k is not object]
    return any(f"self.{name} =" in src or f"self.{name}:" in src for src in map(inspect.getsource, inits))


def internals_problems() -> list[str]:
    """What of torch's private pipelining code this module uses is not where it expects it
    (names, fields, signatures, and the lowering pass it re-implements); empty when all is."""
    problems = [p for (owner, name), expected in _SIGNATURES.items()
                if (p := _signature_problem(f"{owner.__name__}.{name}", getattr(owner, name, None), expected))]
    problems += [p for function, expected in _FUNCTIONS.items()
                 if (p := _signature_problem(function.__name__, function, expected))]
    problems += [f"{cls.__name__} no longer sets self.{name}" for cls, names in _ATTRIBUTES.items()
                 for name in names if not _sets_attribute(cls, name)]
    if _Action._fields != _ACTION_FIELDS:
        problems.append(f"_Action has the fields {_Action._fields}, not {_ACTION_FIELDS}")
    problems += [f"_ComputationType has no {kind}" for kind in _KINDS if not hasattr(_ComputationType, kind)]
    fields = tuple(f.name for f in dataclasses.fields(_PipelineContext))
    problems += [f"_PipelineContext has no field {name}" for name in _CONTEXT_FIELDS if name not in fields]
    if not problems:
        problems += _lowering_problems()
    return problems


def _lowering_problems() -> list[str]:
    orders = {rank: [None if op is None else to_action(op) for op in line] for rank, line in timeline(2, 2, 4).items()}
    return [f"_add_unshard_reshard lowers rank {rank}'s interleaved 1F1B differently from with_unshard_reshard"
            for rank, actions in orders.items()
            if with_unshard_reshard(actions) != _add_unshard_reshard(list(actions), 3)]


def torch_minor(version: str) -> str:
    """'2.12.0a0+5aff3928d8.nv26.05' -> '2.12'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch(version: str) -> None:
    """Pass a release of WRITTEN_FOR; pass a pre-release of one (the GPU image's 2.12.0a0) or another
    torch (with a warning) only when `internals_problems` finds nothing; else raise one sentence."""
    listed = torch_minor(version) in WRITTEN_FOR
    if listed and version.split("+")[0].replace(".", "").isdigit():
        return
    problems = internals_problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RuntimeError(_refusal(version, problems[0] + more))
    if listed:
        return
    warnings.warn(f"torch {version} is not one k2train's pipeline was tested on ({', '.join(WRITTEN_FOR)}); the "
                  f"private pipelining names it uses are in place, but run tests/test_torch_compat.py and the "
                  f"pipeline tests on it before a long run.", stacklevel=2)


# ---- the order: schedule-table operations as torch actions ----------------------------------------

def to_action(op: Op, split_backward: bool = False) -> _Action:
    """The torch action of one table operation; with `split_backward`, a backward's input-gradient pass."""
    kind = C.FORWARD if op.kind == "F" else C.BACKWARD_INPUT if split_backward else C.FULL_BACKWARD
    return _Action(op.stage, kind, op.microbatch)


def paired_actions(pp: int, vp: int, microbatches: int, rank: int, split_backward: bool) -> list[_Action]:
    """Rank `rank`'s compute actions in the paired order: pairs as OVERLAP_F_B with their two
    sub-actions; with `split_backward`, each backward as its input-gradient pass (in the pair) and
    its weight-gradient pass right after."""
    actions: list[_Action] = []
    for step in paired_order(pp, vp, microbatches, rank):
        ops = [to_action(op, split_backward) for op in step]
        actions.append(ops[0] if len(ops) == 1 else _Action(-1, C.OVERLAP_F_B, None, tuple(ops)))
        if split_backward and step[-1].kind == "B":
            actions.append(_Action(step[-1].stage, C.BACKWARD_WEIGHT, step[-1].microbatch))
    return actions


class TheoryInterleaved1F1B(ScheduleInterleaved1F1B):
    """torch's interleaved 1F1B runtime driving the paper's operation order (schedule_table.py),
    whose bubble is the theoretical (p - 1) / (v·m); torch's own order idles longer."""

    def _calculate_single_rank_operations(self, rank: int) -> list[_Action | None]:
        line = timeline(self.pp_group_size, self.n_local_stages, self._n_microbatches)[rank]
        return [None if op is None else to_action(op) for op in line]


class PairedInterleaved1F1B(TheoryInterleaved1F1B):
    """The interleaved 1F1B with communication overlap (parallel.overlap=ep): one more warm-up
    forward, then forward/backward pairs as OVERLAP_F_B actions run by `overlap_forward_backward`."""

    split_backward = False

    def _calculate_single_rank_operations(self, rank: int) -> list[_Action | None]:
        return paired_actions(self.pp_group_size, self.n_local_stages, self._n_microbatches, rank,
                              self.split_backward)

    def _prepare_schedule_with_comms(self, actions, format="compute_only") -> None:
        super()._prepare_schedule_with_comms(actions, format)
        self.pipeline_order_with_comms = {rank: without_paired_forward_sends(line, self._num_stages)
                                          for rank, line in self.pipeline_order_with_comms.items()}

    def _step_microbatches(self, *args, **kwargs):
        # A paired forward's output leaves as soon as that forward ends (`overlap_forward_backward`),
        # not after the whole pair: the next stage's rank gets it a backward earlier.
        self.early_sends: list[list] = []
        result = super()._step_microbatches(*args, **kwargs)
        for works in self.early_sends:
            for work in works:
                work.wait()
        self.early_sends = []
        return result


class PairedInterleavedZeroBubble(PairedInterleaved1F1B):
    """The same pairs with each backward split: the input-gradient pass in the pair, the deferred
    weight-gradient pass after it (parallel.schedule=interleaved_zero_bubble with overlap)."""

    split_backward = True


# ---- the pairs: the runtime's function for an OVERLAP_F_B action ------------------------------

def without_paired_forward_sends(line: Sequence[_Action], num_stages: int) -> list[_Action]:
    """A rank's lowered actions without the SEND_F of each paired forward, which
    `overlap_forward_backward` sends itself when that forward ends. torch's lowering puts it right
    after its OVERLAP_F_B action, before any other send, so sending it earlier inside the pair keeps
    the order of this rank's sends, which is the order its peers post the receives in."""
    out: list[_Action] = []
    sent_early = None
    for i, action in enumerate(line):
        if action == sent_early:
            continue
        sent_early = None
        if action.computation_type == C.OVERLAP_F_B and action.sub_actions[0].stage_index != num_stages - 1:
            forward = action.sub_actions[0]
            sent_early = _Action(forward.stage_index, C.SEND_F, forward.microbatch_index)
            if line[i + 1:i + 2] != [sent_early]:
                raise RuntimeError(f"torch {torch.__version__} does not lower {action} with its {sent_early} right "
                                   "after it; sending that forward's output early could reorder this rank's sends "
                                   "(parallel/pipeline/torch_compat.py without_paired_forward_sends).")
        out.append(action)
    return out


def schedule_stages(schedule) -> list[PipelineStage]:
    """The stages a torch schedule runs: this rank's virtual stages, in stage order (torch keeps
    them in the schedule's private `_stages`)."""
    return list(schedule._stages)


def overlap_forward_backward(turns):
    """The runtime's function for an OVERLAP_F_B action: the forward in this thread, the backward
    taking turns with it (`turns`: parallel/pipeline/overlap.py `Turns`). It does what the runtime
    does for a lone forward and a lone backward, split between the two turns: wait for the
    received inputs, run the stage's chunk, compute or fetch the loss, count the backward."""

    def run(action: _Action, ctx: _PipelineContext) -> None:
        schedule = ctx.schedule_ref
        forward, backward = action.sub_actions
        stages = _stages_by_index(schedule)
        f_stage, b_stage = stages[forward.stage_index], stages[backward.stage_index]
        f_mb, b_mb = forward.microbatch_index, backward.microbatch_index
        # Each task waits for its own received input (the looped placement has no two adjacent
        # stages on one rank when pp > 1, so every input comes over the pipeline group); while one
        # is still on the wire, the other task takes its turn (Turns.wait_for). The runtime keeps a
        # posted receive as its list of dist.Work.
        f_recv = turns.watch([] if f_stage.is_first else schedule.fwd_recv_ops.pop((forward.stage_index, f_mb)))
        b_recv = turns.watch([] if b_stage.is_last else schedule.bwd_recv_ops.pop((backward.stage_index, b_mb)))

        def run_forward() -> None:
            turns.wait_for(f_recv)
            output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb], save_forward_output=False)
            schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)
            if not f_stage.is_last:  # the SEND_F the lowering had after the pair (without_paired_forward_sends)
                schedule.early_sends.append(_batch_p2p(f_stage.get_fwd_send_ops(f_mb)))

        def run_backward() -> None:
            turns.wait_for(b_recv)
            loss = schedule._maybe_get_loss(b_stage, b_mb)
            if backward.computation_type == C.BACKWARD_INPUT:  # its weight-gradient pass is counted when it runs
                b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=False, last_backward=False)
                return
            _full_backward(schedule, b_stage, b_mb, loss)

        turns.run_pair(run_forward, run_backward)

    return run


def lone_backward(turns):
    """The runtime's function for an unpaired FULL_BACKWARD with overlap (the cool-down's): what the
    runtime does for it, run by `Turns.run_alone`, so that its experts' weight gradients are computed
    under its own dispatch exchanges, as a paired backward's are (torch's own path cannot defer them)."""

    def run(action: _Action, ctx: _PipelineContext) -> None:
        schedule = ctx.schedule_ref
        stage = _stages_by_index(schedule)[action.stage_index]
        mb = action.microbatch_index
        if not stage.is_last:  # the looped placement: every gradient comes over the pipeline group
            for work in schedule.bwd_recv_ops.pop((action.stage_index, mb)):
                work.wait()
        turns.run_alone(lambda: _full_backward(schedule, stage, mb, schedule._maybe_get_loss(stage, mb)))

    return run


def _stages_by_index(schedule) -> dict[int, PipelineStage]:
    """This rank's stages of a torch schedule, by stage index."""
    return {stage.stage_index: stage for stage in schedule_stages(schedule)}


def _full_backward(schedule, stage: PipelineStage, mb: int, loss) -> None:
    """A full backward as the runtime runs it once its input is in: counted, the stage's last one so marked."""
    schedule.backward_counter[stage.stage_index] += 1
    last = schedule.backward_counter[stage.stage_index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)


# ---- the lowering ---------------------------------------------------------------------------------

def with_unshard_reshard(actions: Sequence[Action | None], max_active_stages: int = 3) -> list[Action]:
    """torch's `_add_unshard_reshard` (schedules.py) in linear time: idle steps dropped, an
    UNSHARD before the first action of each of the next `max_active_stages` stages to compute, a
    RESHARD for an active stage that is not among them, and for every stage still active at the
    end. torch's own pass rescans the rest of the list at every action, quadratic: seconds per
    rank for k2_1t's 4096 actions. The runtime's lowering runs it, and the placement of the
    receives depends on it."""
    compute = [a for a in actions if a is not None]
    upcoming: dict[int, deque[int]] = {}
    for i, a in enumerate(compute):
        if a.sub_actions is not None:
            raise ValueError(f"action {a} has sub-actions; with_unshard_reshard takes plain compute actions.")
        upcoming.setdefault(a.stage_index, deque()).append(i)
    active: set[int] = set()
    out: list[Action] = []
    for i, a in enumerate(compute):
        for positions in upcoming.values():
            while positions and positions[0] < i:
                positions.popleft()
        nearest = sorted((positions[0], s) for s, positions in upcoming.items() if positions)
        next_n = [s for _, s in nearest[:max_active_stages]]
        fetch = [s for s in next_n if s not in active]
        evict = [s for s in active if s not in next_n]
        for s in evict:
            active.remove(s)
            out.append(Action(s, ComputationType.RESHARD, None))
        for s in fetch:
            active.add(s)
            out.append(Action(s, ComputationType.UNSHARD, None))
        out.append(a)
    out += [Action(s, ComputationType.RESHARD, None) for s in list(active)]
    return out


def lower(compute: dict[int, list[Action | None]], pp: int, num_stages: int,
          micro_batches: int) -> dict[int, list[Action]]:
    """The action lists the runtime executes for a compute-only schedule, as torch's
    `_PipelineScheduleRuntime._prepare_schedule_with_comms` builds them (looped stage placement)."""
    lists = {rank: _add_reduce_grad(with_unshard_reshard(actions), micro_batches)
             for rank, actions in compute.items()}
    return with_send_recv(lists, pp, num_stages)


def with_send_recv(actions: dict[int, list[Action]], pp: int, num_stages: int) -> dict[int, list[Action]]:
    """torch's `_add_send_recv` (looped stage placement): every rank's sends and receives added."""
    return _add_send_recv(actions, stage_to_rank=lambda s: s % pp, num_stages=num_stages)


check_torch(torch.__version__)

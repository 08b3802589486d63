"""memory.optimizer_offload: ZeRO-1 states in host memory, streamed to the device chunk by chunk.

The offloaded optimizer must leave exactly the bits the on-device one leaves: parameters and every
optimizer state, after steps with Muon matrices, expert stacks, AdamW vectors and embeddings,
gradient clipping and QK-Clip firing on a head each step; in one process, in a DP2 gloo world,
and through the training loop with checkpoints saved under one setting and resumed under the other.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from multiproc import run_world
from parallel.zero1.offload import RING, plan_chunks
from test_zero1 import gradient, max_logits

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"
STEPS = 3
LR = 1e-2
SMALL_CHUNK = 32 << 10  # two of the tiny model's 16 kB expert matrices; its 384 kB embedding is cut in 12
OVERRIDES = ["model.num_layers=4", "model.num_experts=8", "optimizer.qk_clip_tau=1.0", "optimizer.max_grad_norm=1.0"]


def test_chunk_plan_cuts_the_owned_items_in_order_within_the_budget():
    rng = random.Random(0)
    items = [(rng.choice([16, 64, 2048, 9000]), rng.random() < 0.7) for _ in range(200)]
    budget = 40_000
    chunks = plan_chunks(items, budget)
    pieces = [piece for chunk in chunks for piece in chunk.pieces]
    # Every element of every item exactly once, in order; Muon matrices whole.
    covered = {}
    for piece in pieces:
        assert piece.start == covered.get(piece.index, 0) and piece.stop > piece.start
        covered[piece.index] = piece.stop
    assert [p.index for p in pieces] == sorted(p.index for p in pieces)
    assert covered == {i: n for i, (n, _) in enumerate(items)}
    assert all(p.stop - p.start == items[p.index][0] for p in pieces if items[p.index][1])
    assert any(p.stop - p.start < items[p.index][0] for p in pieces)  # some AdamW item was cut
    lo = m2_lo = 0
    for chunk in chunks:
        assert (chunk.lo, chunk.m2_lo) == (lo, m2_lo)
        lo, m2_lo = chunk.hi, chunk.m2_hi
        sizes = [(p.stop - p.start, items[p.index][1]) for p in chunk.pieces]
        assert chunk.hi - chunk.lo == sum(n for n, _ in sizes)
        assert chunk.m2_hi - chunk.m2_lo == sum(n for n, muon in sizes if not muon)
        assert chunk.state_bytes() == sum(4 * n * (2 if muon else 3) for n, muon in sizes)
        # Within the budget, or one Muon matrix too large for it alone.
        assert chunk.state_bytes() <= budget or (len(sizes) == 1 and sizes[0][1])
    # Full chunks: a chunk closes only when the next piece does not fit (AdamW fills it up).
    assert sum(c.state_bytes() for c in chunks) / len(chunks) > 0.9 * budget
    assert len(plan_chunks([(10, True)] * 3, 1)) == 3  # each matrix larger than the budget: alone
    assert len(plan_chunks([(10, True)] * 3, 240)) == 1
    cut = plan_chunks([(10, True), (100, False), (10, True)], 600)  # 80 + 1200 + 80 bytes
    assert [[(p.index, p.start, p.stop) for p in c.pieces] for c in cut] == [
        [(0, 0, 10), (1, 0, 43)], [(1, 43, 93)], [(1, 93, 100), (2, 0, 10)]]
    assert plan_chunks([], 100) == []
    with pytest.raises(ValueError, match="memory.optimizer_chunk_mb"):
        plan_chunks(items, 0)


def test_chunk_size_must_be_positive():
    from k2train.config.checks import ConfigError
    from k2train.config.load import load_config

    with pytest.raises(ConfigError, match=r"memory.optimizer_chunk_mb must be greater than 0, got 0.0"):
        load_config(TINY, ["memory.optimizer_chunk_mb=0"])
    assert load_config(TINY, ["memory.optimizer_chunk_mb=0.5"]).memory.optimizer_chunk_bytes == 1 << 19


# -- one process ----------------------------------------------------------------------------------


def local_steps(offload: bool, chunk_bytes: int, dtype: torch.dtype = torch.float32, steps: int = STEPS,
                extra: tuple[str, ...] = ()):
    """STEPS ZeRO-1 MuonClip steps of the whole tiny model: in one process (group size 1), or as
    this rank of an initialised gloo world whose ranks all hold the model (DP: both groups are the world)."""
    from k2train.config.load import load_config
    from k2train.model import K2Model
    from parallel.zero1.optimizer import ShardedMuonClip

    cfg = load_config(TINY, [*OVERRIDES, *extra])
    m = cfg.model
    distributed = torch.distributed.is_initialized()
    group = torch.distributed.group.WORLD if distributed else None
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    model = K2Model(m, seed=cfg.train.seed).to(dtype)
    optimizer = ShardedMuonClip(list(model.named_parameters()), 0, group, group, cfg.optimizer,
                                (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim), distributed,
                                offload=offload, chunk_bytes=chunk_bytes)
    for step in range(steps):
        for name, param in model.named_parameters():
            # Each rank adds its own share, so the reduce_scatter really sums over the group.
            param.grad = (gradient(name, param.shape, step) * (rank + 1)).to(dtype)
        optimizer.reduce(divisor=float(world))
        optimizer.clip_(cfg.optimizer.max_grad_norm)
        assert optimizer.clip_coef < 1.0  # the clipped gradients reach the chunks
        optimizer.step(LR, max_logits(m.num_layers, m.num_heads, step), list(range(m.num_layers)))
    return model, optimizer


def snapshot(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors.update({k: v.detach().clone() for k, v in optimizer.checkpoint_tensors().items()})
    return tensors


def assert_equal_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and any(k.startswith("optim/master/") for k in a), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offloaded_steps_equal_on_device_steps_bit_for_bit(dtype):
    device_model, device_opt = local_steps(False, SMALL_CHUNK, dtype)
    host_model, host_opt = local_steps(True, SMALL_CHUNK, dtype)
    assert all(g.states.offloaded and len(g.states.layout.chunks) > RING for g in host_opt.groups)
    cut = [g.owned[p.index].item.key for g in host_opt.groups for c in g.states.layout.chunks for p in c.pieces
           if p.stop - p.start < g.owned[p.index].item.numel]
    assert "embed_tokens.weight" in cut and "lm_head.weight" in cut  # AdamW items streamed in pieces
    assert all(t.device.type == "cpu" and t.dtype == torch.float32
               for k, t in host_opt.checkpoint_tensors().items() if k.startswith("optim/"))
    device, host = snapshot(device_model, device_opt), snapshot(host_model, host_opt)
    assert any(k.startswith("optim/moment2/") for k in device) and any(".mlp.experts." in k for k in device)
    assert_equal_bits(device, host, "offload on vs off")
    # The steps moved the parameters (the comparison is not of two untouched models).
    fresh = snapshot(*local_steps(False, SMALL_CHUNK, dtype, steps=0))
    for name in ("layers.1.self_attn.q_b_proj.weight", "layers.2.mlp.experts.up_proj", "embed_tokens.weight"):
        assert not torch.equal(fresh[f"param/{name}"], host[f"param/{name}"]), name


def _whole_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row-block keys `name[rows a:b]` joined back into `name`, the blocks concatenated in row order."""
    blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    whole = {}
    for key, tensor in tensors.items():
        name, _, rows = key.partition("[rows ")
        if rows:
            blocks.setdefault(name, []).append((int(rows.split(":")[0]), tensor))
        else:
            whole[key] = tensor
    whole.update({name: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for name, parts in blocks.items()})
    return whole


def test_row_blocks_stream_and_give_the_bits_of_whole_parameters():
    """AdamW row blocks (the 512 x 64 embedding and head in blocks of 32 rows) are items like any
    other: offload on or off, the same bits, and in one process the same bits as whole parameters
    (AdamW is elementwise and the blocks keep the parameter's element order)."""
    blocks = ("optimizer.adamw_block_elements=2048",)
    device = snapshot(*local_steps(False, SMALL_CHUNK, extra=blocks))
    host_model, host_opt = local_steps(True, SMALL_CHUNK, extra=blocks)
    assert_equal_bits(device, snapshot(host_model, host_opt), "row blocks, offload on vs off")
    assert "optim/moment2/lm_head.weight[rows 480:512]" in device and "optim/moment2/lm_head.weight" not in device
    whole = snapshot(*local_steps(False, SMALL_CHUNK))
    assert_equal_bits(whole, _whole_keys(device), "row blocks vs whole parameters")


def test_chunked_update_equals_one_chunk_on_cpu():
    """The chunk plan is shared by both placements, so exactness does not hang on this; but on CPU
    Newton-Schulz of a matrix gives the same bits whether it is batched with 1 or with all its peers."""
    whole = snapshot(*local_steps(False, 1 << 30))
    assert_equal_bits(whole, snapshot(*local_steps(False, SMALL_CHUNK)), "small chunks vs one chunk")


def test_state_bytes_by_place():
    _, device_opt = local_steps(False, SMALL_CHUNK)
    _, host_opt = local_steps(True, SMALL_CHUNK)
    total = device_opt.optimizer_state_bytes()
    assert host_opt.optimizer_state_bytes() == total
    assert device_opt.optimizer_state_bytes_by_place() == {"device": total, "host": 0}
    by_place = host_opt.optimizer_state_bytes_by_place()
    assert by_place["host"] == total
    # Device: RING buffer sets, each holding the largest chunk's states (master, momentum, AdamW moment):
    # within the budget, or one Muon matrix above it (the dense FFN's 128 x 64).
    chunks = [g.states.layout.chunks for g in host_opt.groups]
    assert by_place["device"] == RING * sum(max(c.state_bytes() for c in group) for group in chunks)
    assert all(c.state_bytes() <= SMALL_CHUNK or len(c.pieces) == 1 for group in chunks for c in group)
    assert by_place["device"] < total / 4, (by_place, total)


# -- a DP2 world -----------------------------------------------------------------------------------


def world_steps(payload: dict) -> dict:
    """This rank's tensors after the same steps with offload off, then on."""
    torch.distributed.init_process_group("gloo")
    results = {}
    for offload in (False, True):
        model, optimizer = local_steps(offload, SMALL_CHUNK)
        results[offload] = dict(tensors=snapshot(model, optimizer), owned=sorted(optimizer.owned_gradients()),
                                chunks=[len(g.states.layout.chunks) for g in optimizer.groups],
                                places=[g.states.offloaded for g in optimizer.groups])
    torch.distributed.destroy_process_group()
    return results


def test_offload_in_a_dp2_world_equals_on_device_bit_for_bit():
    ranks = run_world(2, "test_optimizer_offload:world_steps", None)
    for rank, result in enumerate(ranks):
        off, on = result[False], result[True]
        assert off["places"] == [False, False] and on["places"] == [True, True]
        assert min(on["chunks"]) > RING, on["chunks"]
        assert_equal_bits(off["tensors"], on["tensors"], f"rank {rank}")
    # Both ranks own items (the group really is sharded) and hold the same parameters.
    assert all(r[True]["owned"] for r in ranks) and set(ranks[0][True]["owned"]).isdisjoint(ranks[1][True]["owned"])
    for key, value in ranks[0][True]["tensors"].items():
        if key.startswith("param/"):
            assert torch.equal(value, ranks[1][True]["tensors"][key]), key


# -- through the training loop, with checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from k2train.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "sources"
    prepare_dataset(sorted((ROOT / "k2train" / "optim").rglob("*.py")), out, "byte")
    return str(out)


def train_run(tmp: Path, corpus: str, name: str, steps: int, offload: bool, ckpt: Path) -> list[float]:
    from k2train.config.load import load_config
    from parallel.trainer import run_training
    from launch.env import launch_env

    cfg = load_config(TINY, [
        *OVERRIDES, "parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1",
        f"data.prefix={corpus}", "data.seq_len=32", "train.global_batch_tokens=128", "train.micro_batch_size=2",
        f"logging.run_root={tmp}", f"logging.run_name={name}", "logging.wandb=false", "logging.plots=false",
        "logging.progress_bar=false", "optimizer.warmup_steps=1", f"train.steps={steps}",
        f"checkpoint.dir={ckpt}", "checkpoint.every_steps=2", f"memory.optimizer_offload={str(offload).lower()}",
        "memory.optimizer_chunk_mb=0.03125",
    ])
    run_training(cfg, launch_env())
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()[1:]
    return [json.loads(line)["loss"] for line in lines]


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if k.startswith(("model/", "optim/"))}


def test_training_loop_with_offload_saves_and_resumes_either_way(tmp_path, corpus):
    """Offload on and off train the same losses; a checkpoint saved with offload resumes without it,
    and one saved without resumes with it, to the bits of the uninterrupted offloaded run."""
    on = train_run(tmp_path, corpus, "on", 3, True, tmp_path / "c-on")
    assert train_run(tmp_path, corpus, "off-first", 2, False, tmp_path / "c-off-on") == on[:2]
    assert train_run(tmp_path, corpus, "on-then", 3, True, tmp_path / "c-off-on") == on[2:]
    train_run(tmp_path, corpus, "on-first", 2, True, tmp_path / "c-on-off")
    assert train_run(tmp_path, corpus, "off-then", 3, False, tmp_path / "c-on-off") == on[2:]
    final = {d: checkpoint_tensors(tmp_path / d / "step_00000003", tmp_path) for d in ("c-on", "c-off-on", "c-on-off")}
    for name in ("c-off-on", "c-on-off"):
        assert_equal_bits(final["c-on"], final[name], name)

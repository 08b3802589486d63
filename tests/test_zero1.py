"""ZeRO-1 MuonClip against the single-process MuonClip, on the same gradients.

Every rank of a layout gets gradients whose reduction is exact: the sequence rank 0 of each group
contributes the whole gradient times the divisor (a power of two), the others zero. So the sharded
optimizer and `k2train.optim.MuonClip` see identical gradients, and after 5 steps (with a head
above τ every step) the parameters must agree to 1e-6 and every replica must hold the same bits.
One layout cuts the embedding and the head into AdamW row blocks spread over its owners.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from multiproc import run_world, tiny_rank

ROOT = Path(__file__).parents[1]
STEPS = 5
BASE = [
    "model.num_layers=4", "model.num_experts=8", "data.seq_len=16", "train.micro_batch_size=1",
    "train.global_batch_tokens=256", "optimizer.max_grad_norm=0", "optimizer.qk_clip_tau=1.0",
    "logging.wandb=false",
]
DIVISOR = 16  # global_batch_tokens / (seq_len * micro_batch_size): micro-batches x sequence ranks
LR = 1e-2


def gradient(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    """The step's full gradient of a parameter (all experts for an expert stack), the same on every rank."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}@{step}".encode()))
    return torch.randn(shape, generator=generator) * 1e-2


def max_logits(num_layers: int, num_heads: int, step: int) -> torch.Tensor:
    """Head (step % 2) of every layer is above τ = 1 by a step-dependent factor; the rest below."""
    logits = torch.full((num_layers, num_heads), 0.5)
    logits[:, step % 2] = 1.5 + 0.25 * step
    return logits


def sharded_steps(payload: dict) -> dict:
    from parallel.parallelize import model_name

    import parallel.zero1.optimizer

    cfg, state, runner = tiny_rank(payload["overrides"])
    orthogonalised = []  # matrices this rank ran Newton-Schulz on
    newton_schulz_many = parallel.zero1.optimizer.newton_schulz_many

    def counting(matrices, *args):
        orthogonalised.extend(tuple(m.shape) for m in matrices)
        return newton_schulz_many(matrices, *args)

    parallel.zero1.optimizer.newton_schulz_many = counting
    m, layout, coords = cfg.model, state.layout, state.coords
    local = m.num_experts // layout.ep
    for step in range(STEPS):
        for full_name, param in runner.model.named_parameters():
            name = model_name(full_name)
            expert = ".mlp.experts." in name
            full = gradient(name, (m.num_experts, *param.shape[1:]) if expert else param.shape, step)
            mine = full[coords.ep * local:(coords.ep + 1) * local] if expert else full
            contributes = coords.dp == 0 if expert else state.sequence_rank == 0
            param.grad = (mine * DIVISOR if contributes else torch.zeros_like(mine)).to(param.dtype)
        runner.optimizer.reduce(divisor=DIVISOR)
        runner.clip_gradients(cfg.optimizer.max_grad_norm)
        runner.optimizer_step(LR, max_logits(m.num_layers, m.num_heads, step))
    params = {model_name(n): p.detach().float().clone() for n, p in runner.model.named_parameters()}
    masters = {g.param_dtype: g.master.dtype for g in runner.optimizer.groups}
    if state.is_distributed:
        torch.distributed.destroy_process_group()
    owned = [s.item.key for g in runner.optimizer.groups for s in g.owned]
    return dict(params=params, first_expert=coords.ep * local, masters=masters, owned=owned,
                state_bytes=runner.optimizer.optimizer_state_bytes(), orthogonalised=orthogonalised)


def reference_steps(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The single-process MuonClip of k2train.optim on the whole model and the same gradients."""
    from k2train.config.load import load_config
    from k2train.model import K2Model
    from k2train.optim.muon_clip import MuonClip

    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", overrides)
    model = K2Model(cfg.model, seed=cfg.train.seed)
    optimizer = MuonClip.from_config(model, cfg.optimizer)
    for step in range(STEPS):
        for name, param in model.named_parameters():
            param.grad = gradient(name, param.shape, step)
        optimizer.set_lr(LR)
        optimizer.step()
        optimizer.qk_clip_(max_logits(cfg.model.num_layers, cfg.model.num_heads, step))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return reference_steps(BASE + ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1"])


@pytest.fixture(scope="module")
def sharded() -> Callable[..., list[dict]]:
    """`sharded(pp, ep, dp, *extra)`: the float32 multi-process steps of that layout, run once per
    module and shared by the tests that read them."""
    runs: dict[tuple, list[dict]] = {}

    def run(pp: int, ep: int, dp: int, *extra: str) -> list[dict]:
        key = (pp, ep, dp, extra)
        if key not in runs:
            runs[key] = run_world(pp * ep * dp, "test_zero1:sharded_steps",
                                  dict(overrides=layout(pp, ep, dp, "float32", *extra)))
        return runs[key]

    return run


def layout(pp: int, ep: int, dp: int, dtype: str = "float32", *extra: str) -> list[str]:
    vp = 2 if pp > 1 else 1
    return BASE + [f"parallel.pp={pp}", f"parallel.vp={vp}", f"parallel.ep={ep}", f"parallel.dp={dp}",
                   f"train.param_dtype={dtype}", *extra]


# 2048 elements = 32 rows of the tiny model's 512 x 64 embedding and head: 16 row blocks each.
BLOCKS = "optimizer.adamw_block_elements=2048"


@pytest.mark.parametrize("pp,ep,dp,extra", [(1, 1, 1, ()), (1, 1, 2, ()), (1, 1, 4, ()), (1, 2, 1, ()),
                                            (1, 2, 2, (BLOCKS,)), (1, 2, 4, ()), (2, 2, 2, ())],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v))
def test_sharded_muonclip_equals_single_process(pp, ep, dp, extra, reference, sharded):
    ranks = sharded(pp, ep, dp, *extra)
    local = 8 // ep
    for rank, result in enumerate(ranks):
        for name, param in result["params"].items():
            first = result["first_expert"]
            want = reference[name][first:first + local] if ".mlp.experts." in name else reference[name]
            error = ((param - want).norm() / want.norm()).item()
            assert error <= 1e-6, f"rank {rank} {name}: relative error {error:.2e}"
    # Newton-Schulz ran exactly once per matrix per step across the world: as many matrices as the
    # single-process optimizer orthogonalises (each expert's matrix counted once), none twice.
    matrices = sum(p.shape[0] if p.ndim == 3 else 1 for n, p in reference.items()
                   if p.ndim >= 2 and not n.endswith(("embed_tokens.weight", "lm_head.weight")))
    assert sum(len(r["orthogonalised"]) for r in ranks) == STEPS * matrices
    # Replicas (same name, same expert slice) hold the same bits.
    seen: dict[tuple[str, int], torch.Tensor] = {}
    for result in ranks:
        for name, param in result["params"].items():
            key = (name, result["first_expert"] if ".mlp.experts." in name else -1)
            assert torch.equal(seen.setdefault(key, param), param), name
    if extra:
        _check_row_blocks_spread(ranks, ep * dp)


def _check_row_blocks_spread(ranks: list[dict], group: int) -> None:
    """With small AdamW blocks the embedding's and head's 16 row blocks are each owned once, and
    every rank of the (one, pp 1) dense group owns some of each."""
    for name in ("embed_tokens.weight", "lm_head.weight"):
        owners = {}
        for rank, result in enumerate(ranks):
            for key in result["owned"]:
                if key.startswith(f"{name}[rows "):
                    assert key not in owners, f"{key} owned twice"
                    owners[key] = rank
        assert sorted(owners) == sorted(f"{name}[rows {a}:{a + 32}]" for a in range(0, 512, 32))
        assert len(set(owners.values())) == group, (name, owners)


def test_qk_clip_fired_and_changed_the_clipped_heads_only(reference):
    """Without QK-Clip, heads 0 and 1 (clipped in turn) end elsewhere; heads 2 and 3 (never above τ)
    end bit-identical, and so do all value rows."""
    unclipped = reference_steps(BASE + ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", "parallel.dp=1",
                                        "optimizer.qk_clip=false"])
    heads, nope_rope = 4, 24
    q_ref = reference["layers.1.self_attn.q_b_proj.weight"].view(heads, nope_rope, -1)
    q_off = unclipped["layers.1.self_attn.q_b_proj.weight"].view(heads, nope_rope, -1)
    assert [torch.equal(q_ref[h], q_off[h]) for h in range(heads)] == [False, False, True, True]
    kv_ref = reference["layers.1.self_attn.kv_b_proj.weight"].view(heads, 32, -1)
    kv_off = unclipped["layers.1.self_attn.kv_b_proj.weight"].view(heads, 32, -1)
    assert torch.equal(kv_ref[:, 16:], kv_off[:, 16:])


def test_bf16_parameters_keep_float32_masters_and_track_the_float32_run(reference):
    ranks = run_world(2, "test_zero1:sharded_steps", dict(overrides=layout(1, 1, 2, "bfloat16")))
    for result in ranks:
        assert result["masters"] == {torch.bfloat16: torch.float32}
        for name, param in result["params"].items():
            error = ((param - reference[name]).norm() / reference[name].norm()).item()
            assert error <= 1e-2, f"{name}: relative error {error:.2e} beyond bf16 rounding"


def test_optimizer_state_falls_as_one_over_the_group(sharded):
    """dp 1 -> 2 -> 4 with ep 1: each rank's master + state bytes fall as 1/group (up to balancing)."""
    largest, total = {}, {}
    for dp in (1, 2, 4):
        ranks = sharded(1, 1, dp)
        largest[dp] = max(r["state_bytes"] for r in ranks)
        total[dp] = sum(r["state_bytes"] for r in ranks)
    assert total[1] == total[2] == total[4]  # every item's state is kept exactly once
    assert largest[2] <= 0.6 * largest[1] and largest[4] <= 0.35 * largest[1], largest
